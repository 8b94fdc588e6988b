"""int8 weight-only quantization (csm_jax.quantize) against a dequantization derived by hand in numpy.

The reference: q = round(W / s) clipped to [-127, 127] with s = max_j |W[o, j]| / 127 per output row, and the
model run in fp32 with the weights q * s. The quantized model must match that model to fp32 accuracy; how far
both stray from the unquantized model is measured (and bounded) on a tiny random CSM.
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csm_jax import csm
from csm_jax.llama import linear
from csm_jax.evaluate import greedy_agreement
from csm_jax.quantize import Int8Weight, quantize_csm, quantize_int8

ROOT = Path(__file__).resolve().parents[1]


def numpy_int8(w):
    """The hand-derived quantization: (q int8, scale float32), and the dequantized float64 weight."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(1)
    s = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(w / s[:, None]), -127, 127).astype(np.int8)
    return q, s, q.astype(np.float64) * s[:, None].astype(np.float64)


def test_int8_weight_is_the_hand_derived_quantization():
    g = np.random.default_rng(0)
    w = g.standard_normal((64, 48)).astype(np.float32) * np.logspace(-3, 1, 64, dtype=np.float32)[:, None]
    w[5] = 0.0  # a row of zeros: scale 1, codes 0
    qw = quantize_int8(jnp.asarray(w))
    q, s, deq = numpy_int8(w)
    assert qw.q.dtype == jnp.int8 and qw.scale.dtype == jnp.float32 and qw.shape == (64, 48)
    np.testing.assert_allclose(np.asarray(qw.scale), s, rtol=2.5e-7)  # XLA may divide by 127 via its reciprocal
    # Equal codes, except where that last-ulp difference meets a value within 1e-5 of a rounding midpoint.
    differ = np.asarray(qw.q) != q
    frac = np.abs(w / s[:, None]) % 1
    assert np.all(np.abs(frac[differ] - 0.5) < 1e-5) and differ.sum() <= 2
    assert np.all(np.abs(np.asarray(qw.q).astype(int) - q) <= 1)
    assert np.abs(np.asarray(qw.q)).max() == 127 and float(qw.scale[5]) == 1.0
    # Rounding to the nearest grid point: at most half a step from the weight, per row.
    assert np.all(np.abs(deq - w) <= s[:, None] / 2 * (1 + 1e-6))


def test_linear_with_int8_weight_is_a_matmul_with_the_dequantized_weight():
    g = np.random.default_rng(1)
    w = (0.02 * g.standard_normal((96, 64))).astype(np.float32)
    x = g.standard_normal((3, 5, 64)).astype(np.float32)
    _, _, deq = numpy_int8(w)
    want = x.astype(np.float64) @ deq.T
    qw = quantize_int8(jnp.asarray(w))
    got = np.asarray(linear(jnp.asarray(x), qw))
    assert got.dtype == np.float32 and got.shape == (3, 5, 96)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(np.asarray(linear(jnp.asarray(x), qw, jnp.float32)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
    # bf16 activations and scales: the product still accumulates in fp32; bf16 rounding of x, s and the output.
    qb = quantize_int8(jnp.asarray(w, jnp.bfloat16))
    assert qb.dtype == jnp.bfloat16
    got = np.asarray(linear(jnp.asarray(x, jnp.bfloat16), qb).astype(jnp.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max())


def _dequantized_by_hand(qparams):
    """Quantized parameters with every Int8Weight replaced by numpy's q * s (fp32 arrays). It takes q and s as
    quantize_csm stored them: whether those are the right codes is checked against numpy separately (XLA may
    divide through a reciprocal, which moves a code by one step where w / s lies on a rounding midpoint)."""
    def deq(w):
        if not isinstance(w, Int8Weight):
            return w
        return jnp.asarray((np.asarray(w.q).astype(np.float64) * np.asarray(w.scale)[:, None]).astype(np.float32))

    return jax.tree.map(deq, qparams, is_leaf=lambda x: isinstance(x, Int8Weight))


@pytest.mark.slow
def test_quantized_csm_matches_hand_dequantized_model_and_stays_near_fp32():
    cfg = dataclasses.replace(csm.CsmConfig.tiny(), text_vocab_size=1024)
    params = csm.init_params(cfg, jax.random.key(0))
    qparams = quantize_csm(params, "int8")
    # What is quantized, and what is not.
    assert isinstance(qparams["c0_head"], Int8Weight) and all(isinstance(w, Int8Weight) for w in qparams["audio_head"])
    for half in ("backbone", "decoder"):
        for layer in qparams[half]["layers"]:
            assert all(isinstance(layer[k], Int8Weight) for k in ("wqkv", "wo", "w13", "w2"))
            assert not isinstance(layer["attn_norm"], Int8Weight)
    for k in ("text_embed", "audio_embed", "projection"):
        assert qparams[k] is params[k]
    assert qparams["c0_head"].dtype == jnp.float32  # GenState and caches keep the model's dtype
    for w, qw in [(params["c0_head"], qparams["c0_head"]), (params["decoder"]["layers"][1]["w13"],
                                                          qparams["decoder"]["layers"][1]["w13"])]:
        q, s, _ = numpy_int8(w)
        np.testing.assert_allclose(np.asarray(qw.scale), s, rtol=2.5e-7)
        assert np.mean(np.asarray(qw.q) != q) < 1e-4

    frames = 32
    # Against the same model with numpy-dequantized weights: fp32 accuracy, the same greedy codes.
    same = greedy_agreement(cfg, _dequantized_by_hand(qparams), qparams, frames)
    assert same["code_agreement"] == 1.0 and same["first_divergence"] == frames, same
    assert same["c0_logit_error"] < 1e-4 and same["depth_logit_error"] < 1e-4, same
    # Against the unquantized fp32 model (random weights: near-uniform logits, the hardest case for argmax).
    # Measured: 96.6% of the codes, logit rms error 1.4% (c0) and 1.7% (depth) of the logits' spread.
    vs_fp32 = greedy_agreement(cfg, params, qparams, frames)
    print("int8 vs fp32, tiny random CSM:", vs_fp32)
    assert vs_fp32["code_agreement"] >= 0.93, vs_fp32
    assert vs_fp32["c0_logit_rms"] < 0.03 and vs_fp32["depth_logit_rms"] < 0.03, vs_fp32
    assert vs_fp32["c0_logit_error"] < 0.15 and vs_fp32["depth_logit_error"] < 0.15, vs_fp32


def test_quantize_refuses_bad_requests():
    cfg = dataclasses.replace(csm.CsmConfig.tiny(), text_vocab_size=64)
    params = csm.init_params(cfg, jax.random.key(0))
    assert quantize_csm(params, None) is params and quantize_csm(params, "none") is params
    with pytest.raises(ValueError, match="unknown quantization 'int4': use one of int8"):
        quantize_csm(params, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_csm(quantize_csm(params, "int8"), "int8")
    with pytest.raises(ValueError, match="not CSM parameters"):
        quantize_csm({"encoder": {}}, "int8")
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(jnp.zeros((2, 3, 4)))


@pytest.mark.slow
def test_synthesize_with_int8_weights(tmp_path, csm_dir):
    out = tmp_path / "q.wav"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "synthesize.py"), "--checkpoint", str(csm_dir),
                        "--text", "Hello there.", "--out", str(out), "--max-audio-ms", "320", "--quantize", "int8",
                        "--frames-per-call", "2"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    import soundfile as sf

    y, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and 0 < y.size <= 4 * 1920 and y.size % 1920 == 0
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "synthesize.py"), "--checkpoint", str(csm_dir),
                        "--text", "Hi.", "--out", str(tmp_path / "x.wav"), "--quantize", "int4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "int4" in r.stderr and not (tmp_path / "x.wav").exists()
