"""SEANet encoder and decoder of Mimi (moshi 0.2.2 `modules/seanet.py` with Mimi's settings).

Encoder: conv k7 (1->64), then for strides 4, 5, 6, 8: residual block, ELU, conv k=2*stride (channels x2),
then ELU and conv k3 (1024->512). Hop 960 samples (25 Hz).
Decoder: conv k7 (512->1024), then for strides 8, 6, 5, 4: ELU, transposed conv k=2*stride (channels /2),
residual block; then ELU and conv k3 (64->1).
Residual block R(C): x + conv_k1(ELU(conv_k3(ELU(x)))) with C -> C/2 -> C, identity shortcut.

Each function works one-shot (state None) or streaming (state: a dict of per-conv buffers, returned updated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from csm_jax.mimi.conv import (context_size, conv1d, conv1d_step, conv_transpose1d, conv_transpose1d_step, elu)

ENC_STRIDES = (4, 5, 6, 8)
DEC_STRIDES = (8, 6, 5, 4)


class _Streamer:
    """Routes each named conv to its one-shot or streaming form and collects the new buffers."""

    def __init__(self, state):
        self.state = state
        self.new = {} if state is not None else None

    def conv(self, name, p, x, stride=1):
        if self.state is None:
            return conv1d(p, x, stride)
        y, self.new[name] = conv1d_step(p, x, self.state[name], stride)
        return y

    def convtr(self, name, p, x, stride):
        if self.state is None:
            return conv_transpose1d(p, x, stride)
        y, self.new[name] = conv_transpose1d_step(p, x, self.state[name], stride)
        return y


def _residual(s, name, p, x):
    h = s.conv(f"{name}.1", p["conv1"], elu(x))
    return x + s.conv(f"{name}.2", p["conv2"], elu(h))


@jax.named_scope("seanet_encoder")
def encoder(p, x, state=None):
    """x (B, L, 1) -> (B, ceil(L / 960), 512)."""
    s = _Streamer(state)
    h = s.conv("in", p["in"], x)
    for i, stride in enumerate(ENC_STRIDES):
        h = _residual(s, f"res{i}", p["res"][i], h)
        h = s.conv(f"down{i}", p["down"][i], elu(h), stride)
    h = s.conv("out", p["out"], elu(h))
    return h, s.new


@jax.named_scope("seanet_decoder")
def decoder(p, x, state=None):
    """x (B, T, 512) -> (B, 960 * T, 1)."""
    s = _Streamer(state)
    h = s.conv("in", p["in"], x)
    for i, stride in enumerate(DEC_STRIDES):
        h = s.convtr(f"up{i}", p["up"][i], elu(h), stride)
        h = _residual(s, f"res{i}", p["res"][i], h)
    h = s.conv("out", p["out"], elu(h))
    return h, s.new


def _buf(batch, p, stride=1, dtype=jnp.float32):
    k, _, _ = p["w"].shape
    cin = p["w"].shape[1]
    return jnp.zeros((batch, context_size(k, stride), cin), dtype)


def init_encoder_state(p, batch):
    st = {"in": _buf(batch, p["in"]), "out": _buf(batch, p["out"])}
    for i, stride in enumerate(ENC_STRIDES):
        st[f"res{i}.1"] = _buf(batch, p["res"][i]["conv1"])
        st[f"res{i}.2"] = _buf(batch, p["res"][i]["conv2"])
        st[f"down{i}"] = _buf(batch, p["down"][i], stride)
    return st


def init_decoder_state(p, batch):
    st = {"in": _buf(batch, p["in"]), "out": _buf(batch, p["out"])}
    for i, stride in enumerate(DEC_STRIDES):
        k, _, cout = p["up"][i]["w"].shape
        st[f"up{i}"] = jnp.zeros((batch, k - stride, cout), jnp.float32)
        st[f"res{i}.1"] = _buf(batch, p["res"][i]["conv1"])
        st[f"res{i}.2"] = _buf(batch, p["res"][i]["conv2"])
    return st
