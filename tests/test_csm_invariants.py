"""Invariants of our CSM: cached decode equals a full forward, batching does not change a row's codes,
sampling settings behave as documented, and loading is strict."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jax
import jax.numpy as jnp

from csm_jax import llama
from csm_jax.checkpoints import CheckpointError, load_csm
from csm_jax.csm import (CsmConfig, GenState, embed_rows, generate_frames, init_params, prefill, reset_slots,
                         set_sampling)
from csm_jax.sampling import _kth_by_bisection, gumbel_noise, kth_largest, sample
from csm_jax.testing.tiny_csm import build_hf_csm, save_hf_layout

CFG = CsmConfig.tiny()


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(7))


def _text_prompt(n, seed):
    g = np.random.default_rng(seed)
    tokens = np.zeros((n, 33), np.int32)
    tokens[:, 32] = g.integers(0, 128000, n)
    mask = np.zeros((n, 33), bool)
    mask[:, 32] = True
    return tokens, mask


def _batch(prompts):
    S = max(len(t) for t, _ in prompts)
    tokens = np.zeros((len(prompts), S, 33), np.int32)
    mask = np.zeros((len(prompts), S, 33), bool)
    for i, (t, m) in enumerate(prompts):
        tokens[i, :len(t)], mask[i, :len(t)] = t, m
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.array([len(t) for t, _ in prompts])


@pytest.mark.slow
def test_cached_decode_equals_full_forward(params):
    tokens, mask = _text_prompt(30, 0)
    st = GenState.create(CFG, 1)
    st = prefill(params, CFG, st, *_batch([(tokens[:20], mask[:20])]))
    for i in range(20, 30):  # append one row at a time, as generation does
        st = prefill(params, CFG, st, *_batch([(tokens[i:i + 1], mask[i:i + 1])]))
    x = embed_rows(CFG, params, jnp.asarray(tokens[None]), jnp.asarray(mask[None]))
    full, _ = llama.forward(CFG.backbone, params["backbone"], x, jnp.arange(30)[None],
                            llama.init_cache(CFG.backbone, 1, 64, jnp.float32))
    np.testing.assert_allclose(np.asarray(st.h[0]), np.asarray(full[0, -1]), rtol=0, atol=1e-5)
    assert int(st.pos[0]) == 30


def _generate(params, prompts, seeds, n=12, temperature=0.9, topk=50, caps=None):
    B = len(prompts)
    st = GenState.create(CFG, B)
    st = prefill(params, CFG, st, *_batch(prompts))
    st = set_sampling(st, jnp.arange(B), jnp.full(B, temperature), jnp.full(B, topk), jnp.array(seeds),
                      jnp.array(caps or [n] * B))
    st, frames, valid = generate_frames(params, CFG, st, n)
    return np.asarray(frames), np.asarray(valid), st


@pytest.mark.slow
def test_batch_rows_get_what_they_get_alone(params):
    prompts = [_text_prompt(n, s) for n, s in ((9, 1), (23, 2), (16, 3))]
    seeds = [11, 12, 13]
    frames, valid, _ = _generate(params, prompts, seeds)
    assert valid.all()
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        alone, _, _ = _generate(params, [p], [s])
        np.testing.assert_array_equal(frames[i], alone[0], err_msg=f"row {i}")
    # Sampling really samples: different seeds, different codes; codes stay in Mimi's range.
    other, _, _ = _generate(params, prompts[:1], [99])
    assert not np.array_equal(other[0], frames[0])
    assert frames.max() < 2048


@pytest.mark.slow
def test_attention_window_changes_nothing(params, monkeypatch):
    """Reading the cache through the window chosen on the device from the positions gives the codes reading
    the whole cache gives, across window boundaries (prompts of 120 and 250 rows, 12 frames: positions pass
    128 and 256)."""
    prompts = [_text_prompt(120, 1), _text_prompt(250, 2)]
    windowed, _, _ = _generate(params, prompts, [3, 4])
    jax.clear_caches()
    monkeypatch.setattr(llama, "attention_windows", lambda size: (size,))
    try:
        whole, _, _ = _generate(params, prompts, [3, 4])
    finally:
        jax.clear_caches()
    np.testing.assert_array_equal(windowed, whole)


@pytest.mark.slow
def test_frame_cap_and_frozen_rows(params):
    prompts = [_text_prompt(10, 4), _text_prompt(10, 5)]
    frames, valid, st = _generate(params, prompts, [1, 2], n=8, caps=[3, 8])
    assert valid[0].tolist() == [True] * 3 + [False] * 5 and valid[1].all()
    assert st.pos.tolist() == [13, 18] and st.done.tolist() == [True, True]
    # A finished row can be reset and reused; the other row's state is untouched.
    st2 = reset_slots(st, jnp.array([0]))
    assert st2.pos.tolist() == [0, 18] and int((st2.cache["pos"][0] >= 0).sum()) == 0


def test_sampling_rules():
    logits = jnp.array([[0.0, 5.0, 1.0, 9.0, 3.0], [2.0, 2.0, 2.0, 1.0, 0.0]])
    keys = jax.random.split(jax.random.key(0), 2)
    # Greedy never picks a masked code (index 3 is outside `allowed`).
    got = sample(logits, gumbel_noise(keys, 5), jnp.zeros(2), jnp.array([5, 5]), allowed=3)
    assert got.tolist() == [1, 0]
    # top-k 1 is greedy; ties with the k-th value survive (row 1: three equal logits, k=1).
    draws = np.stack([np.asarray(sample(logits, gumbel_noise(jax.random.split(jax.random.key(i), 2), 5), jnp.ones(2),
                                        jnp.array([1, 1]), allowed=5)) for i in range(60)])
    assert set(draws[:, 0]) == {3} and set(draws[:, 1]) == {0, 1, 2}


def test_draw_with_noise_made_ahead_is_jax_categorical():
    """A draw from `gumbel_noise` made ahead (a frame makes its 32 draws' noise in one go) equals
    jax.random.categorical with the same key over the top-k logits divided by the temperature, row by row:
    the sampled codes are the ones a per-step categorical draw gives."""
    rng = np.random.default_rng(3)
    B, V, allowed = 6, 2051, 2048
    logits = jnp.asarray(rng.standard_normal((B, V)).astype(np.float32) * 3)
    temperature, topk = jnp.array([0.9, 1.0, 0.5, 1.3, 0.9, 0.7]), jnp.array([50, 1, 7, 200, 2048, 64])
    for seed in range(4):
        keys = jax.random.split(jax.random.key(seed), B)
        got = np.asarray(sample(logits, gumbel_noise(keys, V), temperature, topk, allowed))
        for b in range(B):
            x = np.asarray(logits[b])[:allowed] / float(temperature[b])
            kth = -np.sort(-x)[int(topk[b]) - 1]
            filtered = np.full(V, -np.inf, np.float32)
            filtered[:allowed] = np.where(x < kth, -np.inf, x)
            assert got[b] == int(jax.random.categorical(keys[b], jnp.asarray(filtered))), (seed, b)


def test_kth_largest_equals_a_sort():
    """Both paths (top_k for k <= 64, bit bisection above) give exactly the k-th value of a descending sort,
    with ties, -inf (masked codes), -0.0/+0.0 and logits of very different scales."""
    rng = np.random.default_rng(0)
    for trial in range(12):
        B, V = 6, 2051
        x = (rng.standard_normal((B, V)) * [1e-3, 1.0, 1e3][trial % 3]).astype(np.float32)
        x[:, rng.integers(0, V, 50)] = x[:, :1]  # ties with the largest region
        x[:, -3:] = -np.inf
        x[0, :10], x[1, :10] = -0.0, 0.0
        big = rng.integers(1, 2049, B)
        small = rng.integers(1, 65, B)
        for k in (big, small):
            want = -np.sort(-x, axis=-1)[np.arange(B), k - 1]
            assert np.array_equal(np.asarray(kth_largest(jnp.asarray(x), jnp.asarray(k)))[:, 0], want)
        want = -np.sort(-x, axis=-1)[np.arange(B), small - 1]
        assert np.array_equal(np.asarray(jax.jit(_kth_by_bisection)(jnp.asarray(x), jnp.asarray(small)))[:, 0], want)


@pytest.mark.slow
def test_strict_loading(tmp_path_factory):
    model = build_hf_csm(seed=1)
    d = save_hf_layout(model, tmp_path_factory.mktemp("c") / "hf", with_tokenizer=False)
    t = load_file(str(d / "model.safetensors"))

    def save(tensors, name):
        out = tmp_path_factory.mktemp(name)
        (out / "config.json").write_text((d / "config.json").read_text())
        save_file(tensors, str(out / "model.safetensors"))
        return out

    missing = dict(t)
    del missing["backbone_model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor 'backbone_model.layers.1.mlp.up_proj.weight' "
                                              r"\(expected shape \(256, 512\)\)"):
        load_csm(save(missing, "missing"))
    extra = dict(t, **{"backbone_model.layers.9.foo": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected tensor.*backbone_model.layers.9.foo"):
        load_csm(save(extra, "extra"))
    bad = dict(t, **{"lm_head.weight": np.zeros((2051, 256), np.float32)})
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' has shape \(2051, 256\), expected \(2051, 512\)"):
        load_csm(save(bad, "shape"))
    mimi_only = {k[len("codec_model."):]: v for k, v in t.items() if k.startswith("codec_model.")}
    with pytest.raises(CheckpointError, match="Mimi checkpoint, not CSM"):
        load_csm(save(mimi_only, "mimi"))
    pt = tmp_path_factory.mktemp("pt") / "model.safetensors"
    pt.write_bytes(b"\x80\x02" + bytes(100))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_csm(pt)


def test_prefill_into_one_slot_touches_only_it(params):
    """prefill into slot 1 alone (one slot computed, written into the batch) equals prefilling every slot
    with no rows for the others."""
    st = GenState.create(CFG, 3)
    tokens, mask, lengths = _batch([_text_prompt(9, 0), _text_prompt(5, 1), _text_prompt(7, 2)])
    st = prefill(params, CFG, st, jnp.asarray(tokens), jnp.asarray(mask), lengths)
    extra_t, extra_m = _text_prompt(6, 3)
    t = np.zeros((3, 6, 33), np.int32)
    m = np.zeros((3, 6, 33), bool)
    t[1], m[1] = extra_t, extra_m
    copy = jax.tree.map(jnp.copy, st)
    ref = prefill(params, CFG, copy, jnp.asarray(t), jnp.asarray(m), jnp.array([0, 6, 0], jnp.int32))
    got = prefill(params, CFG, st, jnp.asarray(extra_t[None]), jnp.asarray(extra_m[None]), jnp.array([6], jnp.int32),
                  jnp.array([1], jnp.int32))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_generating_some_slots_equals_the_whole_batch(params):
    """Stepping only some slots gives them the frames the whole-batch step gives them, and leaves the
    other slots exactly as they were."""
    def start():
        st = GenState.create(CFG, 4)
        st = prefill(params, CFG, st, *_batch([_text_prompt(6 + i, i) for i in range(4)]))
        return set_sampling(st, jnp.arange(4), jnp.full(4, 0.9), jnp.full(4, 50), jnp.arange(4), jnp.full(4, 9))

    full, f_frames, f_valid = generate_frames(params, CFG, start(), 3)
    st = start()
    before = jax.tree.map(jnp.copy, st)
    part, p_frames, p_valid = generate_frames(params, CFG, st, 3, jnp.array([2, 0]))
    np.testing.assert_array_equal(np.asarray(p_frames), np.asarray(f_frames)[[2, 0]])
    np.testing.assert_array_equal(np.asarray(p_valid), np.asarray(f_valid)[[2, 0]])
    for a, b, c in zip(jax.tree.leaves(part), jax.tree.leaves(full), jax.tree.leaves(before)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b, c = (jax.random.key_data(x) for x in (a, b, c))
        a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
        np.testing.assert_allclose(a[[0, 2]], b[[0, 2]], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(a[[1, 3]], c[[1, 3]])


def test_prefill_in_pieces_equals_one_call(params):
    """A long prompt prefilled in pieces (csm.prefill_pieces, as the engine does) leaves the state one call
    over the whole prompt leaves: prompts of different lengths, appended after an earlier turn, so pieces
    start at other positions than 0 and a short prompt has no rows in the last piece."""
    from csm_jax.csm import PREFILL_CHUNK, PREFILL_STEP, prefill_pieces

    first = _batch([_text_prompt(37, 5), _text_prompt(11, 6)])
    prompts = [_text_prompt(2 * PREFILL_CHUNK + 44, 7), _text_prompt(PREFILL_CHUNK + 3, 8)]
    tokens, mask, lengths = (np.asarray(a) for a in _batch(prompts))

    def start():
        return prefill(params, CFG, GenState.create(CFG, 2), *first)

    one = prefill(params, CFG, start(), jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(lengths))
    pieces = list(prefill_pieces(tokens, mask, lengths))
    assert PREFILL_CHUNK == 128 and PREFILL_STEP == 32
    assert [p[0].shape[1] for p in pieces] == [128, 128, 64]  # the rest (44 rows) rounded up to 64
    assert [p[2].tolist() for p in pieces] == [[128, 128], [128, 3], [44, 0]]
    st = start()
    for t, m, n in pieces:
        st = prefill(params, CFG, st, t, m, n)
    assert st.pos.tolist() == one.pos.tolist() == [37 + 2 * PREFILL_CHUNK + 44, 11 + PREFILL_CHUNK + 3]
    np.testing.assert_allclose(np.asarray(st.h), np.asarray(one.h), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(st.cache["pos"]), np.asarray(one.cache["pos"]))
    for a, b in zip(st.cache["k"] + st.cache["v"], one.cache["k"] + one.cache["v"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    # A short prompt is one piece, rounded up to a multiple of 32.
    short = list(prefill_pieces(tokens[:, :90], mask[:, :90], [90, 9]))
    assert len(short) == 1 and short[0][0].shape[1] == 96 and short[0][2].tolist() == [90, 9]
