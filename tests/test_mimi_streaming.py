"""Streaming Mimi equals one-shot Mimi: per-chunk encode and per-frame decode, batched over independent
streams of different lengths, with a stream reset mid-batch.

Both sides are our fp32 code, computed in different shapes; audio must agree within 1e-5 of its peak and
codes exactly (the latents agree to ~1e-6, and the test signals have no near-ties at that level; see
test_mimi_parity for how near-ties are handled against the references).
"""

import numpy as np
import pytest

import jax.numpy as jnp

from csm_jax.mimi import (decode, decode_step, encode, encode_step, init_decoder_state, init_encoder_state,
                          load_mimi, reset_state_rows)
from csm_jax.testing.inputs import speech_like

F = 1920


@pytest.fixture(scope="module")
def params(mimi_files):
    return load_mimi(mimi_files["moshi_path"])[1]


def _run_streams(params, plan, steps, enc):
    """plan[row] = list of (start_step, payload array) streams run back to back in that row."""
    B = len(plan)
    st = init_encoder_state(params, B) if enc else init_decoder_state(params, B)
    outs = {}
    for step in range(steps):
        rows_reset = np.zeros(B, bool)
        inputs = np.zeros((B, F) if enc else (B, 32), np.float32 if enc else np.int32)
        active = np.zeros(B, bool)
        for b, streams in enumerate(plan):
            for sid, (start, data) in enumerate(streams):
                n = data.shape[0] // F if enc else data.shape[1]
                if start <= step < start + n:
                    i = step - start
                    rows_reset[b] |= (i == 0 and step > 0)
                    inputs[b] = data[i * F:(i + 1) * F] if enc else data[:, i]
                    active[b] = True
        if rows_reset.any():
            fresh = (init_encoder_state if enc else init_decoder_state)(params, 1)
            st = reset_state_rows(st, jnp.asarray(rows_reset), fresh)
        if enc:
            st, y = encode_step(params, st, jnp.asarray(inputs), active=jnp.asarray(active))
        else:
            st, y = decode_step(params, st, jnp.asarray(inputs), active=jnp.asarray(active))
        y = np.asarray(y)
        for b, streams in enumerate(plan):
            for sid, (start, data) in enumerate(streams):
                n = data.shape[0] // F if enc else data.shape[1]
                if start <= step < start + n:
                    outs.setdefault((b, sid), []).append(y[b])
    return {k: np.stack(v, axis=-1 if enc else 0) for k, v in outs.items()}


@pytest.mark.slow
def test_streaming_encode_equals_one_shot(params):
    # Row 0: one long stream (past the 250-step window at 25 Hz). Row 1: a short stream, then a reset and
    # a second stream starting mid-batch while row 0 keeps going.
    a = speech_like(F * 140, seed=21)
    b1 = speech_like(F * 30, seed=22)
    b2 = speech_like(F * 40, seed=23)
    plan = [[(0, a)], [(0, b1), (60, b2)]]
    got = _run_streams(params, plan, 140, enc=True)
    for key, x in {(0, 0): a, (1, 0): b1, (1, 1): b2}.items():
        want = np.asarray(encode(params, jnp.asarray(x[None])))[0]
        np.testing.assert_array_equal(got[key], want, err_msg=f"stream {key}")


@pytest.mark.slow
def test_streaming_decode_equals_one_shot(params):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 2048, (32, 140)).astype(np.int32)
    b1 = rng.integers(0, 2048, (32, 30)).astype(np.int32)
    b2 = rng.integers(0, 2048, (32, 40)).astype(np.int32)
    plan = [[(0, a)], [(0, b1), (60, b2)]]
    got = _run_streams(params, plan, 140, enc=False)
    for key, codes in {(0, 0): a, (1, 0): b1, (1, 1): b2}.items():
        want = np.asarray(decode(params, jnp.asarray(codes[None])))[0]
        audio = got[key].reshape(-1)
        assert audio.shape == want.shape
        err = np.abs(audio - want).max() / np.abs(want).max()
        assert err < 1e-5, f"stream {key}: streaming differs from one-shot by {err:.2e} of peak"


def test_step_input_checks(params):
    st = init_encoder_state(params, 1)
    with pytest.raises(ValueError, match="1920"):
        encode_step(params, st, jnp.zeros((1, 1000)))
