"""Mimi in JAX against the PyTorch references on the same random weights (fp32).

Latents: our unquantized 12.5 Hz latent within 1e-5 of the reference's peak.
Codes: identical to the reference's, except at near-ties. Our latent and the reference's differ by fp32
rounding (~1e-6 of peak), and when two codewords are almost equally near, that is enough to pick the other
one. Each frame where codes differ is checked in float64: at its first differing stage, the reference's pick
must be the nearest for the reference's latent and ours the nearest for ours, up to the rounding of a
distance computed in fp32 the way moshi computes it (|x|^2 - 2 x.e + |e|^2, torch.cdist's matrix-product form
for many rows: cancellation leaves an error of about sqrt(256) fp32 epsilons of |x|^2 + |e|^2, which for
random weights can be 1e-5 of the distance itself, and which CPU kernels round differently; ours computes
the shortlisted distances directly, so this bound is loose for it), and the two distances must be within
1e-3 of each other. Later stages of such a frame quantize a different residual and are not compared.
Such frames must stay rare (at most 3%).
Audio: decoding the reference's codes, within 1e-4 of the reference's peak.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from csm_jax.mimi import decode, encode, load_mimi
from csm_jax.mimi.model import encode_latent
from csm_jax.testing.inputs import speech_like

LONG = 1920 * 160  # 12.8 s: 320 steps at 25 Hz, past the 250-step attention window
ODD = 24000 * 3 + 777  # not a multiple of 1920: exercises the right padding and the replicate downsample
EPS32 = float(np.finfo(np.float32).eps)
DIMS = 256  # codebook dimension: the length of the dot products whose rounding adds up
NEAR_TIE = 1e-3  # how close two distances must be for a flip to be explained by latent rounding


def check_codes(ours, ref, z_ours, z_ref, params):
    """ours (B, C, T) vs ref, given both latents (B, T, 512). Returns the fraction of frames with a near-tie flip."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    z_ours, z_ref = np.asarray(z_ours, np.float64), np.asarray(z_ref, np.float64)
    assert np.abs(z_ours - z_ref).max() <= 1e-5 * np.abs(z_ref).max(), "latents differ beyond fp32 rounding"
    q = {k: {n: np.asarray(v, np.float64) for n, v in params["quantizer"][k].items()} for k in ("first", "rest")}

    def distances(z, b, t, c):
        """Squared distances of the stage-c residual to every codeword, and their fp32 rounding bound."""
        if c == 0:
            r, E = z[b, t] @ q["first"]["in"], q["first"]["codebooks"][0]
        else:
            r, E = z[b, t] @ q["rest"]["in"], q["rest"]["codebooks"][c - 1]
            for s in range(c - 1):
                r = r - q["rest"]["codebooks"][s][ref[b, s + 1, t]]
        d = ((r[None] - E) ** 2).sum(-1)
        return d, np.sqrt(DIMS) * EPS32 * ((r ** 2).sum() + (E ** 2).sum(-1))

    flipped = 0
    B, C, T = ref.shape
    for b in range(B):
        for t in range(T):
            diff = np.nonzero(ours[b, :, t] != ref[b, :, t])[0]
            if diff.size == 0:
                continue
            c = int(diff[0])
            o, r = ours[b, c, t], ref[b, c, t]
            (d_o, tol_o), (d_r, tol_r) = distances(z_ours, b, t, c), distances(z_ref, b, t, c)
            where = f"frame {t}, codebook {c}: ours {o}, reference {r}"
            assert d_r[r] - d_r.min() <= tol_r[r] + tol_r[d_r.argmin()], \
                f"{where}: the reference's pick is not its nearest (beyond fp32 rounding)"
            assert d_o[o] - d_o.min() <= tol_o[o] + tol_o[d_o.argmin()], \
                f"{where}: our pick is not the nearest for our latent (beyond fp32 rounding)"
            gap = abs(d_o[o] - d_o[r]) / d_o[r]
            assert gap <= NEAR_TIE, f"{where}: distances differ by {gap:.2e}, not a near-tie"
            flipped += 1
    return flipped / (B * T)


def moshi_latent(model, x):
    with torch.no_grad():
        return model._encode_to_unquantized_latent(torch.from_numpy(x)[:, None]).numpy().transpose(0, 2, 1)


def _codes_vary(codes):
    codes = np.asarray(codes)
    # Weights that quantize everything to a few codewords would make code equality a weak test.
    assert len(np.unique(codes[0, 0])) >= 8
    assert len(np.unique(codes[0, 1:].ravel())) > 100


@pytest.fixture(scope="module")
def params_moshi(mimi_files):
    return load_mimi(mimi_files["moshi_path"])[1]


@pytest.mark.slow
@pytest.mark.parametrize("length", [LONG, ODD])
def test_matches_moshi(mimi_files, params_moshi, length):
    model = mimi_files["moshi_model"]
    x = speech_like(length, seed=length % 97)[None]
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x)[:, None]).numpy()
    ours = np.asarray(encode(params_moshi, jnp.asarray(x)))
    assert ours.shape == (1, 32, -(-length // 1920)) and ours.dtype == np.int32
    _codes_vary(ref)
    flipped = check_codes(ours, ref, encode_latent(params_moshi, jnp.asarray(x)), moshi_latent(model, x), params_moshi)
    assert flipped <= 0.03, f"{flipped:.1%} of frames differ at a near-tie; expected a rare event"

    with torch.no_grad():
        ref_audio = model.decode(torch.from_numpy(ref)).numpy()[:, 0]
    audio = np.asarray(decode(params_moshi, jnp.asarray(ref)))
    assert audio.shape == ref_audio.shape == (1, 1920 * ref.shape[2])
    err = np.abs(audio - ref_audio).max() / np.abs(ref_audio).max()
    assert err < 1e-4, f"decoded audio differs by {err:.2e} of the reference's peak"


@pytest.mark.slow
def test_fewer_codebooks_match_moshi(mimi_files, params_moshi):
    model = mimi_files["moshi_model"]
    x = speech_like(1920 * 20, seed=3)[None]
    model.set_num_codebooks(8)
    try:
        with torch.no_grad():
            ref = model.encode(torch.from_numpy(x)[:, None]).numpy()
            ref_audio = model.decode(torch.from_numpy(ref)).numpy()[:, 0]
    finally:
        model.set_num_codebooks(32)
    ours = np.asarray(encode(params_moshi, jnp.asarray(x), num_codebooks=8))
    assert ours.shape == ref.shape == (1, 8, 20)
    assert check_codes(ours, ref, encode_latent(params_moshi, jnp.asarray(x)), moshi_latent(model, x),
                       params_moshi) <= 0.03
    audio = np.asarray(decode(params_moshi, jnp.asarray(ref)))
    assert np.abs(audio - ref_audio).max() / np.abs(ref_audio).max() < 1e-4


@pytest.mark.slow
def test_transformers_layout_matches_transformers(mimi_files, params_moshi):
    from transformers import MimiModel

    hf, info = MimiModel.from_pretrained(str(mimi_files["hf_dir"]), output_loading_info=True)
    assert not any(info.values()), info  # the converted file is complete for transformers too
    hf.eval()
    params_hf = load_mimi(mimi_files["hf_dir"])[1]
    # Both layouts of the same weights load to the same parameters (q/k un-permuted exactly).
    for a, b in zip(jax.tree.leaves(params_hf), jax.tree.leaves(params_moshi)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    x = speech_like(LONG + 1000, seed=11)[None]
    with torch.no_grad():
        ref = hf.encode(torch.from_numpy(x)[:, None], num_quantizers=32).audio_codes.numpy()
    ours = np.asarray(encode(params_hf, jnp.asarray(x)))
    with torch.no_grad():
        z_ref = hf.encoder(torch.from_numpy(x)[:, None]).latents.numpy().transpose(0, 2, 1)
    assert check_codes(ours, ref, encode_latent(params_hf, jnp.asarray(x)), z_ref, params_hf) <= 0.03
    with torch.no_grad():
        ref_audio = hf.decode(torch.from_numpy(ref)).audio_values.numpy()[:, 0]
    audio = np.asarray(decode(params_hf, jnp.asarray(ref)))
    assert audio.shape == ref_audio.shape
    assert np.abs(audio - ref_audio).max() / np.abs(ref_audio).max() < 1e-4


def test_bad_inputs(params_moshi):
    with pytest.raises(ValueError, match="empty"):
        encode(params_moshi, jnp.zeros((1, 0)))
    with pytest.raises(ValueError, match="between 1 and 32"):
        encode(params_moshi, jnp.zeros((1, 1920)), num_codebooks=33)
    with pytest.raises(ValueError, match=r"\(batch, samples\)"):
        encode(params_moshi, jnp.zeros((1920,)))
    with pytest.raises(ValueError, match="1 to 32"):
        decode(params_moshi, jnp.zeros((1, 33, 2), jnp.int32))
