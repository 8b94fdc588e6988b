"""Mimi end to end: 24 kHz audio <-> 32 codebooks at 12.5 Hz, one-shot and streaming.

  encode: audio (B, L) -> SEANet encoder (B, ceil(L/960), 512) -> transformer (25 Hz)
          -> learnt stride-2 downsample, replicate-padded (B, ceil(L/1920), 512) -> split RVQ -> codes (B, n_q, T)
  decode: codes -> RVQ decode (B, T, 512) -> depthwise stride-2 transposed-conv upsample (B, 2T, 512)
          -> transformer (25 Hz) -> SEANet decoder -> audio (B, 1920 T)

Parameters are a plain dict (see `csm_jax.mimi.checkpoint` for how files map onto it), all of one compute
dtype (float32 unless bfloat16 was asked for at load time); activations and streaming state take that dtype
too, while audio in and out is float32. Streaming state is a dict of arrays, carried through jitted steps and
donated; rows are independent streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from csm_jax.mimi import rvq, seanet
from csm_jax.mimi import transformer as tr
from csm_jax.mimi.conv import conv1d, conv1d_step, conv_transpose1d, conv_transpose1d_step


@dataclass(frozen=True)
class MimiConfig:
    """Mimi as released (kyutai/mimi; moshi 0.2.2 `loaders.get_mimi`). Only these values are supported."""

    sample_rate: int = 24_000
    frame_size: int = 1920  # samples per 12.5 Hz frame
    num_codebooks: int = 32  # stored in the checkpoint; encode may use fewer
    codebook_size: int = 2048
    dimension: int = 512
    context: int = tr.CONTEXT

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size


def _check_audio_batch(audio):
    if audio.ndim != 2:
        raise ValueError(f"Mimi expects audio shaped (batch, samples), got {audio.shape}")
    if audio.shape[1] < 1:
        raise ValueError("Mimi cannot encode empty audio (0 samples)")


def compute_dtype(params):
    """The dtype Mimi computes in: that of its parameters (one for all, chosen when they were loaded)."""
    return params["decoder"]["in"]["w"].dtype


def _latent(params, audio):
    h, _ = seanet.encoder(params["encoder"], audio[:, :, None].astype(compute_dtype(params)))
    pos = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32), h.shape[:2])
    h, _ = tr.transformer(params["encoder_transformer"], h, pos)
    return conv1d(params["downsample"], h, stride=2, replicate=True)


@jax.jit
def encode_latent(params, audio):
    """audio (B, L) -> the unquantized 12.5 Hz latent (B, ceil(L / 1920), 512) that the RVQ reads."""
    return _latent(params, audio)


@partial(jax.jit, static_argnames=("num_codebooks",))
def _encode(params, audio, num_codebooks):
    return rvq.encode(params["quantizer"], _latent(params, audio), num_codebooks)


def encode(params, audio, num_codebooks: int = 32):
    """audio (B, L) float32 at 24 kHz, any L >= 1 -> codes (B, num_codebooks, ceil(L / 1920)) int32."""
    if not 1 <= num_codebooks <= 32:
        raise ValueError(f"num_codebooks must be between 1 and 32, got {num_codebooks}")
    _check_audio_batch(audio)
    return _encode(params, audio, num_codebooks)


@jax.jit
def _decode(params, codes):
    z = rvq.decode(params["quantizer"], codes)
    h = conv_transpose1d(params["upsample"], z, stride=2, groups=z.shape[-1])
    pos = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32), h.shape[:2])
    h, _ = tr.transformer(params["decoder_transformer"], h, pos)
    y, _ = seanet.decoder(params["decoder"], h)
    return y[:, :, 0].astype(jnp.float32)


def decode(params, codes):
    """codes (B, n_q, T) int -> audio (B, 1920 T) float32. Codes must lie in [0, 2048)."""
    if codes.ndim != 3:
        raise ValueError(f"Mimi expects codes shaped (batch, num_codebooks, frames), got {codes.shape}")
    if not 1 <= codes.shape[1] <= 32:
        raise ValueError(f"codes have {codes.shape[1]} codebooks; Mimi has 1 to 32")
    return _decode(params, jnp.asarray(codes, jnp.int32))


# ----------------------------------------------------------------------------------------------- streaming


def _as(dtype, buffers):
    return jax.tree.map(lambda x: x.astype(dtype), buffers)


def init_encoder_state(params, batch_size: int):
    """Fresh state for `batch_size` independent encoder streams (shapes and dtype taken from `params`)."""
    dt = compute_dtype(params)
    return {
        "seanet": _as(dt, seanet.init_encoder_state(params["encoder"], batch_size)),
        "transformer": tr.init_caches(params["encoder_transformer"], batch_size, dt),
        "down": jnp.zeros((batch_size, 2, params["downsample"]["w"].shape[1]), dt),
        "offset": jnp.zeros((batch_size,), jnp.int32),
        "first": jnp.ones((batch_size,), bool),
    }


def init_decoder_state(params, batch_size: int):
    """Fresh state for `batch_size` independent decoder streams (shapes and dtype taken from `params`)."""
    dt = compute_dtype(params)
    return {
        "seanet": _as(dt, seanet.init_decoder_state(params["decoder"], batch_size)),
        "transformer": tr.init_caches(params["decoder_transformer"], batch_size, dt),
        "up": jnp.zeros((batch_size, 2, params["upsample"]["w"].shape[2]), dt),
        "offset": jnp.zeros((batch_size,), jnp.int32),
        "first": jnp.ones((batch_size,), bool),
    }


def _keep_rows(new, old, active):
    """Rows where `active` is False keep their old state (a paused or finished stream). The transformer's rings
    are `new`'s as they are: their writes were already masked by `active` (a select over them would copy the
    whole rings, the most of the state, at every step)."""
    if active is None:
        return new

    def pick(n, o):
        mask = active.reshape((-1,) + (1,) * (n.ndim - 1))
        return jnp.where(mask, n, o)

    rest = {name: x for name, x in new.items() if name != "transformer"}
    return dict(jax.tree.map(pick, rest, {name: old[name] for name in rest}), transformer=new["transformer"])


@partial(jax.jit, static_argnames=("num_codebooks",), donate_argnums=(1,))
def _encode_step(params, state, chunk, active, num_codebooks):
    B = chunk.shape[0]
    h, sean = seanet.encoder(params["encoder"], chunk[:, :, None].astype(compute_dtype(params)), state["seanet"])
    pos = state["offset"][:, None] + jnp.arange(h.shape[1], dtype=jnp.int32)
    h, caches = tr.transformer(params["encoder_transformer"], h, pos, state["transformer"], active)
    # The downsample is replicate-padded: a stream's first step sees its first latent twice on the left.
    buf = jnp.where(state["first"][:, None, None], jnp.broadcast_to(h[:, :1], state["down"].shape), state["down"])
    z, down = conv1d_step(params["downsample"], h, buf, stride=2)
    codes = rvq.encode(params["quantizer"], z, num_codebooks)[:, :, 0]
    new = {"seanet": sean, "transformer": caches, "down": down,
           "offset": state["offset"] + h.shape[1], "first": jnp.zeros((B,), bool)}
    return _keep_rows(new, state, active), codes


def encode_step(params, state, chunk, num_codebooks: int = 32, active=None):
    """One 1920-sample chunk per stream: chunk (B, 1920) -> (state, codes (B, num_codebooks)).

    `active` (B,) bool: rows that are False keep their state unchanged (their codes are meaningless).
    The state is donated: use the returned one.
    """
    if chunk.ndim != 2 or chunk.shape[1] != 1920:
        raise ValueError(f"encode_step takes chunks of shape (batch, 1920), got {chunk.shape}; "
                         "zero-pad the last chunk of a stream")
    return _encode_step(params, state, chunk, active, num_codebooks)


@partial(jax.jit, donate_argnums=(1,))
def _decode_step(params, state, codes, active):
    z = rvq.decode(params["quantizer"], codes[:, :, None])
    h, up = conv_transpose1d_step(params["upsample"], z, state["up"], stride=2, groups=z.shape[-1])
    pos = state["offset"][:, None] + jnp.arange(h.shape[1], dtype=jnp.int32)
    h, caches = tr.transformer(params["decoder_transformer"], h, pos, state["transformer"], active)
    y, sean = seanet.decoder(params["decoder"], h, state["seanet"])
    new = {"seanet": sean, "transformer": caches, "up": up,
           "offset": state["offset"] + h.shape[1], "first": jnp.zeros_like(state["first"])}
    return _keep_rows(new, state, active), y[:, :, 0].astype(jnp.float32)


def decode_step(params, state, codes_frame, active=None):
    """One frame of codes per stream: codes_frame (B, n_q) -> (state, audio (B, 1920)). State is donated."""
    if codes_frame.ndim != 2:
        raise ValueError(f"decode_step takes codes shaped (batch, num_codebooks), got {codes_frame.shape}")
    return _decode_step(params, state, jnp.asarray(codes_frame, jnp.int32), active)


@partial(jax.jit, donate_argnums=(0,))
def reset_state_rows(state, rows, fresh):
    """Rows where `rows` (B,) is True start a fresh stream; the others are untouched. `fresh` is a one-stream
    state as `init_encoder_state` / `init_decoder_state` make it (batch 1). `state` is donated: updated in
    place, never copied.

    A reset row becomes that fresh state but for its transformer rings' keys and values: their positions
    become -1 (empty), so no query sees the old keys (attention reads only cells whose position is >= 0), and
    the stream's own keys overwrite them as it goes. Those rings are most of the state (8 MB a decoder stream
    in fp32), and a reset then writes only the positions and the small convolution buffers."""

    def reset(x, f):
        return jnp.where(rows.reshape((-1,) + (1,) * (x.ndim - 1)), f, x)

    rings = [(k, v, reset(pos, fresh_pos)) for (k, v, pos), (_, _, fresh_pos)
             in zip(state["transformer"], fresh["transformer"])]
    rest = {name: x for name, x in state.items() if name != "transformer"}
    return dict(jax.tree.map(reset, rest, {name: fresh[name] for name in rest}), transformer=rings)
