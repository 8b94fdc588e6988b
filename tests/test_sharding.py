"""Sharded generation on a mesh equals one device (csm_jax.sharding).

The checks run in a child process on 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8),
so the rest of the suite keeps one device. The child is this file run as a script: it computes every result
once on one device (the reference: no mesh, no sharding) and once on the mesh, and prints them as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here takes tens of seconds on 2 cores

FRAMES = 6
PROMPT_ROWS = (9, 17, 33, 40, 5, 24, 12, 30)  # one prompt length per slot: the slots stop at different rows


def _prompts(cfg, rng, lengths):
    B, S = len(lengths), max(lengths)
    tokens = np.zeros((B, S, cfg.num_codebooks + 1), np.int32)
    mask = np.zeros_like(tokens, bool)
    for b, n in enumerate(lengths):
        text = rng.random(n) < 0.5  # text rows and audio rows, as a voice prompt interleaves them
        tokens[b, :n, -1] = rng.integers(0, cfg.text_vocab_size, n)
        tokens[b, :n, :-1] = rng.integers(0, 2048, (n, cfg.num_codebooks))
        mask[b, :n, -1] = text
        mask[b, :n, :-1] = ~text[:, None]
    return tokens, mask, np.asarray(lengths, np.int32)


def _child() -> dict:
    import jax
    import jax.numpy as jnp

    from csm_jax import csm, sharding

    assert jax.device_count() == 8, jax.devices()
    cfg = csm.CsmConfig.tiny()
    params = csm.init_params(cfg, jax.random.key(0))
    tokens, mask, lengths = _prompts(cfg, np.random.default_rng(0), PROMPT_ROWS)
    B = len(lengths)
    out: dict = {}

    def prefilled(p, mesh, rows):
        state = csm.GenState.create(cfg, len(rows), max_seq_len=256)
        put = (lambda x: x) if mesh is None else (lambda x: sharding.shard_batch(x, mesh))
        if mesh is not None:
            state = sharding.shard_state(state, mesh)
        for t, m, n in csm.prefill_pieces(tokens[rows], mask[rows], lengths[rows]):
            state = csm.prefill(p, cfg, state, put(t), put(m), put(n))
        return state

    def generate(p, mesh, temperature):
        state = prefilled(p, mesh, np.arange(B))
        state = csm.set_sampling(state, jnp.arange(B), jnp.full((B,), temperature), jnp.full((B,), 50),
                                 jnp.arange(B) + 1234, jnp.full((B,), 100))
        state, codes, valid = csm.generate_frames(p, cfg, state, FRAMES)
        return state, np.asarray(codes), np.asarray(valid)

    # (a) data parallel: 8 slots over data=8, parameters replicated, the state split along "data"
    mesh = sharding.make_mesh()
    out["mesh"] = dict(mesh.shape)
    dp_params = sharding.shard_params(params, mesh)
    for name, temperature in (("greedy", 0.0), ("sampled", 0.9)):
        _, ref_codes, ref_valid = generate(params, None, temperature)
        state, codes, valid = generate(dp_params, mesh, temperature)
        out[name] = {"equal": bool(np.array_equal(codes, ref_codes) and np.array_equal(valid, ref_valid)),
                     "frames": int(valid.sum()), "distinct_rows": len({c.tobytes() for c in codes}),
                     "mismatched_codes": int((codes != ref_codes).sum())}
    out["state_after_generate"] = {"k": list(state.cache["k"][0].sharding.shard_shape(state.cache["k"][0].shape)),
                                   "key": list(state.key.sharding.shard_shape(state.key.shape))}
    placed = sharding.shard_state(csm.GenState.create(cfg, B, max_seq_len=256), mesh)
    k0 = placed.cache["k"][0]
    out["shard_shapes_dp"] = {"k": [list(k0.shape), list(k0.sharding.shard_shape(k0.shape))],
                              "cache_pos": list(placed.cache["pos"].sharding.shard_shape(placed.cache["pos"].shape)),
                              "key": list(placed.key.sharding.shard_shape(placed.key.shape)),
                              "devices_holding_k": len({s.device for s in k0.addressable_shards})}

    # (b) tensor parallel: data=2 x model=4, wo and w2 split along "model"; two slots
    rows = np.array([2, 3])  # the two longest prompts: positions past 32 rows
    ref_h = prefilled(params, None, rows).h
    ref = np.asarray(csm.backbone_logits(params, ref_h))
    for data, model in ((2, 4), (1, 8)):
        tp_mesh = sharding.make_mesh(data=data, model=model)
        tp_params = sharding.shard_params(params, tp_mesh)
        h = prefilled(tp_params, tp_mesh, rows).h
        logits = np.asarray(csm.backbone_logits(tp_params, h))
        out[f"tp_{data}x{model}"] = {"max_rel": float(np.abs(logits - ref).max() / np.abs(ref).max()),
                                     "argmax_equal": bool(np.array_equal(logits.argmax(-1), ref.argmax(-1)))}
    wo = tp_params["backbone"]["layers"][0]["wo"]
    w2 = tp_params["backbone"]["layers"][0]["w2"]
    wqkv = tp_params["backbone"]["layers"][0]["wqkv"]
    out["shard_shapes_tp"] = {n: [list(w.shape), list(w.sharding.shard_shape(w.shape))]
                              for n, w in (("wo", wo), ("w2", w2), ("wqkv", wqkv))}

    # bad inputs: one-line errors
    errors = {}
    for name, fn in (("model3", lambda: sharding.make_mesh(model=3)),
                     ("data3", lambda: sharding.make_mesh(data=3)),
                     ("slots4", lambda: sharding.shard_state(csm.GenState.create(cfg, 4, max_seq_len=64), mesh))):
        try:
            fn()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    out["errors"] = errors
    return out


def test_sharded_generation_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 8, "model": 1}
    # (a) codes identical to one device, greedy and sampled with the same seeds; the runs are not degenerate
    for name in ("greedy", "sampled"):
        assert out[name]["equal"], out[name]
        assert out[name]["frames"] == 8 * FRAMES and out[name]["distinct_rows"] == 8, out[name]
    # (b) tensor-parallel logits: only the summation order of the split products differs (fp32)
    for mesh in ("tp_2x4", "tp_1x8"):
        assert out[mesh]["max_rel"] < 1e-5, out[mesh]
        assert out[mesh]["argmax_equal"], out[mesh]
    # (c) the placements split: one slot per device, keys too; wo and w2 split along their inputs
    k_shape, k_shard = out["shard_shapes_dp"]["k"]
    assert k_shard == [1] + k_shape[1:] and out["shard_shapes_dp"]["devices_holding_k"] == 8
    assert out["shard_shapes_dp"]["cache_pos"] == [1, 256] and out["shard_shapes_dp"]["key"] == [1]
    assert out["state_after_generate"] == {"k": k_shard, "key": [1]}, out["state_after_generate"]
    tp = out["shard_shapes_tp"]  # last mesh: 1 x 8
    assert tp["wo"][1] == [tp["wo"][0][0], tp["wo"][0][1] // 8]
    assert tp["w2"][1] == [tp["w2"][0][0], tp["w2"][0][1] // 8]
    assert tp["wqkv"][1] == tp["wqkv"][0]  # fused rows: replicated
    assert "positive divisor" in out["errors"]["model3"]
    assert "must equal the 8 devices" in out["errors"]["data3"]
    assert "multiple of 8 slots" in out["errors"]["slots4"]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(_child()))
