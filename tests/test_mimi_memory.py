"""Mimi one-shot memory grows linearly with the length of the audio, and the pieces that made it so are exact.

Memory is XLA's own account of the compiled program (`memory_analysis().temp_size_in_bytes`: the scratch
the program needs besides its arguments and outputs), read at two lengths; nothing is run or timed. The
attention used to build (T, T) scores over the whole clip (at 25 Hz, 10 minutes: 8 x 15,000^2 floats per
layer, 7 GB), which made memory quadratic beyond a few minutes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from csm_jax.mimi import decode, load_mimi
from csm_jax.mimi import model as mimi_model
from csm_jax.mimi import transformer as tr
from csm_jax.mimi.conv import conv_transpose1d
from csm_jax.testing.inputs import speech_like


@pytest.fixture(scope="module")
def params(mimi_files):
    return load_mimi(mimi_files["moshi_path"])[1]


@pytest.fixture(scope="module")
def shapes(params):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)


def temp_bytes(fn, *args):
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_one_shot_memory_grows_linearly(shapes):
    short, long = 30, 240  # seconds; 750 and 6,000 steps at 25 Hz, far past the 250-step window
    enc = [temp_bytes(mimi_model._encode, shapes, jax.ShapeDtypeStruct((1, s * 24000), jnp.float32), 32)
           for s in (short, long)]
    dec = [temp_bytes(mimi_model._decode, shapes, jax.ShapeDtypeStruct((1, 32, s * 25 // 2), jnp.int32))
           for s in (short, long)]
    ratio = long / short
    # Linear up to a constant (weights-sized scratch); quadratic scores would give ~13x here.
    assert enc[1] <= 1.05 * ratio * enc[0], f"encode scratch {enc[0] / 1e6:.0f} -> {enc[1] / 1e6:.0f} MB"
    assert dec[1] <= 1.05 * ratio * dec[0], f"decode scratch {dec[0] / 1e6:.0f} -> {dec[1] / 1e6:.0f} MB"
    # And small per second of audio: a few activations of the 64-channel 24 kHz layers (measured 15.4 MB/s
    # for encode, 18.4 MB/s for decode, on CPU).
    assert enc[1] / long < 20e6 and dec[1] / long < 24e6, (enc, dec)


def test_blocked_attention_is_the_sliding_window_attention():
    """One-shot attention in blocks against the window computed by hand in numpy, query by query."""
    g = np.random.default_rng(0)
    B, T, N, H = 2, 2 * tr.CONTEXT + 37, 2, 8  # three blocks, the last one partial
    q, k, v = (g.standard_normal((B, T, N, H)).astype(np.float32) for _ in range(3))
    pos = np.broadcast_to(np.arange(T, dtype=np.int32) + 5, (B, T))  # consecutive, not starting at 0
    got = np.asarray(tr._attend_blocks(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos)))
    want = np.zeros((B, T, N, H))
    for t in range(T):
        s = slice(max(0, t - tr.CONTEXT + 1), t + 1)  # key t' visible iff 0 <= t - t' < 250
        logits = np.einsum("bnh,bsnh->bns", q[:, t].astype(np.float64), k[:, s]) / np.sqrt(H)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        want[:, t] = np.einsum("bns,bsnh->bnh", w / w.sum(-1, keepdims=True), v[:, s])
    np.testing.assert_allclose(got, want.reshape(B, T, N * H), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [4, 5, 8])
def test_transposed_conv_matches_torch(stride):
    g = np.random.default_rng(stride)
    x = g.standard_normal((2, 11, 24)).astype(np.float32)
    w = g.standard_normal((24, 16, 2 * stride)).astype(np.float32)  # torch ConvTranspose1d (in, out, k)
    b = g.standard_normal(16).astype(np.float32)
    with torch.no_grad():
        ref = torch.nn.functional.conv_transpose1d(torch.from_numpy(x).transpose(1, 2), torch.from_numpy(w),
                                                   torch.from_numpy(b), stride=stride)
    ref = ref.numpy().transpose(0, 2, 1)[:, : 11 * stride]  # causal: the last k - stride samples trimmed
    p = {"w": jnp.asarray(w.transpose(2, 0, 1)), "b": jnp.asarray(b)}
    got = np.asarray(conv_transpose1d(p, jnp.asarray(x), stride))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_blocked_attention_clip_matches_moshi(mimi_files, params):
    """A 24 s clip (600 steps at 25 Hz: the blocked attention) against moshi: the latent within 1e-5 of its
    peak, and moshi's codes decoded within 1e-4 of the peak of moshi's audio (tests/test_mimi_parity.py's
    tolerances; the codes themselves are compared there, on clips that take the full product)."""
    model = mimi_files["moshi_model"]
    x = speech_like(24000 * 24, seed=5)[None]
    with torch.no_grad():
        xt = torch.from_numpy(x)[:, None]
        z_ref = model._encode_to_unquantized_latent(xt).numpy().transpose(0, 2, 1)
        codes = model.encode(xt)
        audio_ref = model.decode(codes).numpy()[:, 0]
    z = np.asarray(mimi_model.encode_latent(params, jnp.asarray(x)))
    assert z.shape == z_ref.shape == (1, 300, 512)
    assert np.abs(z - z_ref).max() <= 1e-5 * np.abs(z_ref).max()
    audio = np.asarray(decode(params, jnp.asarray(codes.numpy())))
    assert audio.shape == audio_ref.shape
    assert np.abs(audio - audio_ref).max() <= 1e-4 * np.abs(audio_ref).max()
