"""int8 weight-only quantization of CSM's large matmul weights, computed at load from any checkpoint.

A weight W (out, in) becomes q = round(W / s) in int8 with one scale per output channel (row),
s = max_j |W[o, j]| / 127 (symmetric, no zero point; a row of zeros gets s = 1 so that q = 0). `llama.linear`
computes x · W^T as (x · q^T) * s: the int8 matrix is converted to the activations' dtype inside the matmul,
so XLA fuses the conversion and a batch-1 step reads half the bytes of bf16 weights (a quarter of fp32).

Quantized: every transformer layer's wqkv, wo, w13 and w2 (backbone and depth decoder), c0_head and the
31 audio heads: 98% of the weight bytes a frame reads. The embeddings (gathered rows, not matmuls), the
depth decoder's input projection and the norms keep their dtype. Activations, the KV cache, norms, RoPE
and softmax are untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

MODES = ("int8",)
LAYER_WEIGHTS = ("wqkv", "wo", "w13", "w2")


@struct.dataclass
class Int8Weight:
    """A weight (out, in) stored as int8 values q (out, in) and per-output-channel scales (out,):
    W ≈ q * scale[:, None]. `scale` keeps the dtype of the weight it replaced, so `dtype` still says what the
    model computes in (bf16 holds every int8 value exactly, so q converts to it without loss)."""

    q: jax.Array
    scale: jax.Array

    @property
    def shape(self):
        return self.q.shape

    @property
    def dtype(self):
        return self.scale.dtype

    @property
    def size(self):
        return self.q.size

    @property
    def nbytes(self):
        return self.q.nbytes + self.scale.nbytes

    def dequantize(self):
        return self.q.astype(self.scale.dtype) * self.scale[:, None]


@jax.jit
def quantize_int8(w) -> Int8Weight:
    """w (out, in) float -> Int8Weight, with scales computed in fp32 and stored in w's dtype."""
    if w.ndim != 2:
        raise ValueError(f"int8 quantization takes a 2-D (out, in) weight, got shape {w.shape}")
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(w.dtype)
    # Divide by the stored (possibly bf16-rounded) scale, so that q * scale is the nearest point of its grid.
    q = jnp.clip(jnp.round(w32 / scale.astype(jnp.float32)[:, None]), -127, 127).astype(jnp.int8)
    return Int8Weight(q, scale)


def quantize_csm(params: dict, mode: str | None) -> dict:
    """CSM parameters with the large matmul weights quantized (`mode` "int8"), or unchanged (`mode` None).

    The input is not modified; the quantized leaves are new arrays (the full-precision ones are freed once
    the caller drops the old tree)."""
    if mode is None or mode == "none":
        return params
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)} (or none)")

    def stack(llama_params):
        layers = [{k: (quantize_int8(v) if k in LAYER_WEIGHTS else v) for k, v in layer.items()}
                  for layer in llama_params["layers"]]
        return dict(llama_params, layers=layers)

    for name in ("c0_head", "audio_head", "backbone", "decoder"):
        if name not in params:
            raise ValueError(f"not CSM parameters: {name!r} is missing (have {sorted(params)})")
    if any(isinstance(w, Int8Weight) for w in [params["c0_head"], *params["audio_head"]]):
        raise ValueError("these parameters are already quantized")
    return dict(params, c0_head=quantize_int8(params["c0_head"]),
                audio_head=[quantize_int8(w) for w in params["audio_head"]],
                backbone=stack(params["backbone"]), decoder=stack(params["decoder"]))
