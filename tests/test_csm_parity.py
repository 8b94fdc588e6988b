"""CSM in JAX against transformers' CsmForConditionalGeneration on the same random weights (fp32).

Tolerance: logits within 1e-4 of the reference's largest magnitude (relative), codes identical.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from csm_jax import llama
from csm_jax.checkpoints import load_csm
from csm_jax.csm import GenState, backbone_logits, depth_decoder, embed_rows, generate_frames, prefill, set_sampling
from csm_jax.testing.tiny_csm import build_hf_csm, save_hf_layout, save_sesame_layout

RTOL = 1e-4


@pytest.fixture(scope="module")
def csm(tmp_path_factory):
    model = build_hf_csm(seed=0)
    root = tmp_path_factory.mktemp("csm")
    hf_dir = save_hf_layout(model, root / "hf")
    ses_dir = save_sesame_layout(model, root / "sesame")
    return model, load_csm(hf_dir), ses_dir


def _prompt(n_text, n_audio, seed):
    """Rows: text, then audio frames, then an all-zero EOS frame, then text (a context segment + target)."""
    g = np.random.default_rng(seed)
    S = n_text + n_audio + 1 + 8
    tokens = np.zeros((S, 33), np.int32)
    mask = np.zeros((S, 33), bool)
    tokens[:n_text, 32] = g.integers(0, 128000, n_text)
    mask[:n_text, 32] = True
    tokens[n_text:n_text + n_audio, :32] = g.integers(0, 2048, (n_audio, 32))
    mask[n_text:n_text + n_audio + 1, :32] = True  # includes the EOS frame of zeros
    tokens[-8:, 32] = g.integers(0, 128000, 8)
    mask[-8:, 32] = True
    return tokens, mask


def _hf_embeds(model, tokens, mask):
    """The reference's embeddings for our rows, built with its own modules."""
    t = torch.from_numpy(tokens.astype(np.int64))[None]
    audio = model.backbone_model.embed_tokens(t[..., :32])  # sums the 32 codebooks' embeddings
    text = model.embed_text_tokens(t[..., 32])
    is_text = torch.from_numpy(mask[:, 32])[None, :, None]
    return torch.where(is_text, text, audio)


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def test_backbone_logits_long_prompt(csm):
    model, ck, _ = csm
    tokens, mask = _prompt(200, 1400, seed=1)  # 1609 rows: positions past 1500
    with torch.no_grad():
        hidden = model.backbone_model(inputs_embeds=_hf_embeds(model, tokens, mask)).last_hidden_state
        ref = model.lm_head(hidden)[0].numpy()  # (S, 2051)
    cfg, p = ck.config, ck.params
    x = embed_rows(cfg, p, jnp.asarray(tokens[None]), jnp.asarray(mask[None]))
    cache = llama.init_cache(cfg.backbone, 1, cfg.max_seq_len, jnp.float32)
    h, _ = jax.jit(llama.forward, static_argnums=0)(cfg.backbone, p["backbone"], x,
                                                   jnp.arange(len(tokens))[None], cache)
    ours = np.asarray(backbone_logits(p, h[0]))
    for sl in (slice(0, 100), slice(1500, None)):
        assert _rel(ours[sl], ref[sl]) < RTOL, f"rows {sl}: {_rel(ours[sl], ref[sl]):.2e}"


@pytest.mark.slow
def test_depth_decoder_logits_teacher_forced(csm):
    model, ck, _ = csm
    g = np.random.default_rng(2)
    h = g.standard_normal((2, 512)).astype(np.float32)
    codes = g.integers(0, 2048, (2, 32)).astype(np.int32)
    with torch.no_grad():
        ids = torch.from_numpy(codes.astype(np.int64))
        ids = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :31]], 1)  # [placeholder, c0..c30]
        out = model.depth_decoder(input_ids=ids, backbone_last_hidden_state=torch.from_numpy(h))
        ref = out.logits.numpy()  # positions 1..31 (position 0 dropped) predict codebooks 1..31
    teacher = jnp.asarray(codes)
    _, ours = depth_decoder(ck.config, ck.params, jnp.asarray(h), teacher[:, 0], lambda lg, i: teacher[:, i])
    assert ours.shape == ref.shape == (2, 31, 2051)
    assert _rel(ours, ref) < RTOL, _rel(ours, ref)
    # Batch 1 takes another path on CPU (the first two positions fed one by one).
    for r in range(2):
        _, alone = depth_decoder(ck.config, ck.params, jnp.asarray(h[r:r + 1]), teacher[r:r + 1, 0],
                                 lambda lg, i: teacher[r:r + 1, i])
        assert _rel(alone[0], ref[r]) < RTOL, (r, _rel(alone[0], ref[r]))


@pytest.mark.slow
def test_greedy_generation_matches(csm):
    model, ck, _ = csm
    ids = np.random.default_rng(3).integers(0, 128000, 40)
    n = 20
    with torch.no_grad():
        ref = model.generate(input_ids=torch.from_numpy(ids[None]), do_sample=False, depth_decoder_do_sample=False,
                             max_new_tokens=n, min_new_tokens=n)
    ref = np.asarray(ref)[0]
    assert ref.shape == (n, 32)
    cfg, p = ck.config, ck.params
    tokens = np.zeros((1, 40, 33), np.int32)
    tokens[0, :, 32] = ids
    mask = np.zeros((1, 40, 33), bool)
    mask[0, :, 32] = True
    st = GenState.create(cfg, 1)
    st = prefill(p, cfg, st, jnp.asarray(tokens), jnp.asarray(mask), jnp.array([40]))
    st = set_sampling(st, jnp.array([0]), jnp.array([0.0]), jnp.array([50]), jnp.array([0]), jnp.array([n]))
    st, frames, valid = generate_frames(p, cfg, st, n)
    assert bool(valid.all())
    np.testing.assert_array_equal(np.asarray(frames[0]), ref)


@pytest.mark.slow
def test_sesame_layout_loads_identically(csm):
    _, ck, ses_dir = csm
    ck2 = load_csm(ses_dir)
    assert ck2.config == ck.config and ck2.codec_tensors is None
    for a, b in zip(jax.tree.leaves(ck.params), jax.tree.leaves(ck2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
