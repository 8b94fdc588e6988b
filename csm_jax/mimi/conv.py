"""Causal 1-D convolutions as in moshi 0.2.2 (`modules/conv.py`), one-shot and streaming.

Layout is time-major: activations (B, T, C), conv kernels (K, C_in / groups, C_out) ("WIO").

One-shot padding (moshi `StreamingConv1d.forward`, identical in transformers' MimiConv1d):
  k_eff = (k - 1) * dilation + 1; left pad k_eff - stride; right pad only to complete the last stride
  window, so the output has ceil(T / stride) frames. Zeros everywhere, edge replication in the downsample.
Transposed convs produce (T - 1) * stride + k samples and drop k - stride from the right.

Streaming keeps, per conv, the last k_eff - stride inputs (the left context); chunks must be multiples of
the stride, which holds for 1920-sample chunks through every layer of Mimi. Each transposed conv keeps the
k - stride overlapping output samples (without bias) and adds them to the next chunk's head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_DIMS = ("NWC", "WIO", "NWC")


def _conv(x, w, stride=1, dilation=1, groups=1):
    return lax.conv_general_dilated(x, w, window_strides=(stride,), padding="VALID",
                                    rhs_dilation=(dilation,), dimension_numbers=_DIMS,
                                    feature_group_count=groups)


def context_size(k: int, stride: int = 1, dilation: int = 1) -> int:
    """Inputs a streaming conv keeps between chunks."""
    return (k - 1) * dilation + 1 - stride


def conv1d(p, x, stride: int = 1, dilation: int = 1, replicate: bool = False):
    """One-shot causal conv: x (B, T, C_in) -> (B, ceil(T / stride), C_out)."""
    k = p["w"].shape[0]
    k_eff = (k - 1) * dilation + 1
    pad_left = k_eff - stride
    T = x.shape[1]
    n_out = -(-T // stride)
    pad_right = (n_out - 1) * stride + k_eff - pad_left - T
    mode = "edge" if replicate else "constant"
    x = jnp.pad(x, ((0, 0), (pad_left, max(pad_right, 0)), (0, 0)), mode=mode)
    y = _conv(x, p["w"], stride, dilation)
    return y + p["b"] if "b" in p else y


def conv1d_step(p, x, buf, stride: int = 1, dilation: int = 1):
    """Streaming causal conv: x (B, T, C_in) with T % stride == 0, buf (B, context, C_in) -> (y, new buf)."""
    full = jnp.concatenate([buf, x.astype(buf.dtype)], axis=1)
    y = _conv(full, p["w"], stride, dilation)
    new_buf = full[:, full.shape[1] - buf.shape[1]:] if buf.shape[1] else buf
    return (y + p["b"] if "b" in p else y), new_buf


def _transposed_full(x, w, stride, groups):
    """conv_transpose1d without trimming: (B, T, C_in) -> (B, (T - 1) * stride + k, C_out).

    `w` (k, C_in, C_out), or (k, 1, C) when depthwise, with w[j, c, o] = torch_weight[c, o, j]. With
    m = k / stride, output block b (the `stride` samples from b * stride) is sum_i x[b - i] · w[i * stride:
    (i + 1) * stride]: an ordinary convolution of m taps over the input (zero-padded by m - 1 on both sides)
    with stride * C_out output channels, reshaped to time. No zero-stuffed input as a dilated convolution
    would read, and no per-frame (k, C_out) patches to overlap-add: the only intermediate is the output.
    """
    k = w.shape[0]
    if k % stride:
        raise NotImplementedError(f"transposed conv with kernel {k} not a multiple of stride {stride}")
    B, T, _ = x.shape
    m = k // stride
    if groups == 1:
        C = w.shape[2]
        taps = w.reshape(m, stride, w.shape[1], C)[::-1].transpose(0, 2, 1, 3).reshape(m, w.shape[1], stride * C)
        y = _conv(jnp.pad(x, ((0, 0), (m - 1, m - 1), (0, 0))), taps)  # (B, T + m - 1, stride * C)
        return y.reshape(B, (T + m - 1) * stride, C)
    if groups == x.shape[-1] and w.shape[1] == 1:  # depthwise (Mimi's 25 Hz upsample): small, as patches
        P = (x[:, :, None, :] * w[:, 0, :]).reshape(B, T, m, stride, x.shape[-1])
        y = sum(jnp.pad(P[:, :, i], ((0, 0), (i, m - 1 - i), (0, 0), (0, 0))) for i in range(m))
        return y.reshape(B, (T + m - 1) * stride, x.shape[-1])
    raise NotImplementedError("grouped transposed conv other than depthwise")


def conv_transpose1d(p, x, stride: int, groups: int = 1):
    """One-shot causal transposed conv: (B, T, C_in) -> (B, T * stride, C_out), trimmed on the right."""
    k = p["w"].shape[0]
    y = _transposed_full(x, p["w"], stride, groups)
    y = y[:, : y.shape[1] - (k - stride)]
    return y + p["b"] if "b" in p else y


def conv_transpose1d_step(p, x, tail, stride: int, groups: int = 1):
    """Streaming transposed conv: x (B, T, C_in), tail (B, k - stride, C_out) -> (y (B, T * stride, C_out), tail).

    As moshi 0.2.2: the overlap carried to the next chunk excludes the bias, so it is added once.
    """
    k = p["w"].shape[0]
    y = _transposed_full(x, p["w"], stride, groups)
    ov = k - stride
    y = y + jnp.pad(tail.astype(y.dtype), ((0, 0), (0, y.shape[1] - ov), (0, 0)))
    out, new_tail = y[:, : y.shape[1] - ov], y[:, y.shape[1] - ov:]
    return (out + p["b"] if "b" in p else out), new_tail


def elu(x):
    return jax.nn.elu(x, alpha=1.0)
