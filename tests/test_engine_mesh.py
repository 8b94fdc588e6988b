"""The engine and Generator on a mesh of every local device equal one device (csm_jax.bundle, csm_jax.engine).

As tests/test_sharding.py: a child process on 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
computes every result once on one device (a Generator without a mesh: the reference) and once on the mesh
(slots split along "data"), and prints them as JSON; the rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

TEXTS = ["Hello there.", "How are you today?", "A third one.", "Four.", "And the fifth text."]
FRAMES_PER_CALL = 4


def _compare(mesh_runs, ref_runs) -> dict:
    """(audio, codes) pairs on the mesh against the same on one device."""
    codes_equal = all(np.array_equal(c, rc) for (_, c), (_, rc) in zip(mesh_runs, ref_runs))
    rel = max(float(np.abs(a - ra).max() / np.abs(ra).max()) if a.shape == ra.shape else float("inf")
              for (a, _), (ra, _) in zip(mesh_runs, ref_runs))
    return {"codes_equal": codes_equal, "audio_max_rel": rel, "frames": [int(c.shape[1]) for _, c in mesh_runs],
            "distinct": len({c.tobytes() for _, c in mesh_runs})}


def _child(checkpoint: str) -> dict:
    import jax

    from csm_jax import sharding
    from csm_jax.engine import Engine, Request
    from csm_jax.generate import Generator

    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(devices=jax.local_devices())
    one = Generator(checkpoint, frames_per_call=FRAMES_PER_CALL)
    gen = Generator(checkpoint, frames_per_call=FRAMES_PER_CALL, mesh=mesh)
    out: dict = {"mesh": dict(mesh.shape)}

    # (a) a batch of five texts (eight slots on the mesh, three idle), greedy and sampled with the same seeds
    for name, temperature in (("greedy", 0.0), ("sampled", 0.9)):
        kw = dict(speakers=[0, 1, 0, 1, 0], seeds=[11, 12, 13, 14, 15], temperature=temperature,
                  max_audio_ms=[640, 480, 800, 320, 560], return_codes=True)
        out[name] = _compare(gen.generate(TEXTS, **kw), one.generate(TEXTS, **kw))

    # (b) requests admitted at different steps: one inserted into a busy batch, two admitted together later
    def staggered(model):
        engine = Engine(model, slots=8, frames_per_call=FRAMES_PER_CALL)
        reqs = [Request(TEXTS[0], seed=1, max_audio_ms=1280), Request(TEXTS[1], speaker=1, seed=2, max_audio_ms=640),
                Request(TEXTS[2], seed=3, temperature=0.0, max_audio_ms=480), Request(TEXTS[4], seed=4,
                                                                                       max_audio_ms=400)]
        got = {id(r): ([], []) for r in reqs}
        plan = {0: reqs[:1], 2: reqs[1:2], 3: reqs[2:]}  # step -> requests submitted before it
        step = 0
        while step in plan or engine.busy():
            for r in plan.get(step, []):
                assert engine.submit(r) is not None
            for ev in engine.step().values():
                got[id(ev.owner)][0].append(ev.audio)
                got[id(ev.owner)][1].append(ev.codes)
            step += 1
        shards = {"k": engine.state.cache["k"][0], "key": engine.state.key, "done": engine.state.done,
                  "mimi": jax.tree.leaves(engine.mimi_state)[0]}
        runs = [(np.concatenate(got[id(r)][0]), np.concatenate(got[id(r)][1]).T) for r in reqs]
        return runs, shards

    runs, shards = staggered(gen)
    ref_runs, _ = staggered(one)
    out["staggered"] = _compare(runs, ref_runs)
    # (c) the state really is split: each device holds its own slot of every field, the parameters whole
    out["shards"] = {n: [list(a.shape), list(a.sharding.shard_shape(a.shape)), len({s.device for s in
                                                                                    a.addressable_shards})]
                     for n, a in shards.items()}
    w = gen.params["backbone"]["layers"][0]["wo"]
    out["shards"]["wo"] = [list(w.shape), list(w.sharding.shard_shape(w.shape)), len(w.sharding.device_set)]

    # bad input: a slot count that the mesh cannot split
    try:
        Engine(gen, slots=4)
        out["slots4"] = None
    except ValueError as e:
        out["slots4"] = str(e)
    return out


def test_engine_and_generator_on_a_mesh_equal_one_device(csm_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, __file__, str(csm_dir)], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["mesh"] == {"data": 8, "model": 1}
    # codes identical, audio within fp32 rounding; the runs are not degenerate (frames made, rows differ)
    for name in ("greedy", "sampled", "staggered"):
        assert out[name]["codes_equal"], out[name]
        assert out[name]["audio_max_rel"] <= 1e-5, out[name]
        assert min(out[name]["frames"]) >= 3 and out[name]["distinct"] == len(out[name]["frames"]), out[name]
    # one slot per device for the cache, the PRNG keys, the flags and Mimi's state; parameters replicated
    for name in ("k", "key", "done", "mimi"):
        shape, shard, devices = out["shards"][name]
        assert shape[0] == 8 and shard == [1] + shape[1:] and devices == 8, (name, out["shards"][name])
    shape, shard, devices = out["shards"]["wo"]
    assert shard == shape and devices == 8
    assert "multiple of 8 slots" in out["slots4"], out["slots4"]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(_child(sys.argv[1])))
