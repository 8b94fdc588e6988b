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

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

MODES = ("int8",)
LAYER_WEIGHTS = ("wqkv", "wo", "w13", "w2")


@partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"], meta_fields=[])
@dataclass
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


def greedy_agreement(cfg, ref_params: dict, test_params: dict, num_frames: int, prompt_rows: int = 16,
                     seed: int = 0) -> dict:
    """How far `test_params` (e.g. quantized) stray from `ref_params` on one greedy stream of `num_frames`
    frames after a random text prompt. Both read the same context: the reference's own greedy codes are fed
    back to both (teacher forcing), so every one of the num_frames * 32 codes is compared in the same place.

    Returns {"code_agreement": fraction of the greedy codes that are equal, "c0_agreement", "depth_agreement",
    "c0_logit_error" and "depth_logit_error": max |test - ref| over all logits / std of the reference logits,
    "c0_logit_rms" and "depth_logit_rms": the same with the rms difference, "first_divergence": the frame at
    which free-running greedy generation with `test_params` first emits a different code (num_frames if never)}.
    """
    import numpy as np

    from csm_jax.csm import MIMI_CODES

    C = cfg.num_codebooks
    prompt = np.random.default_rng(seed).integers(0, cfg.text_vocab_size, prompt_rows).astype(np.int32)
    none = jnp.zeros((num_frames, C), jnp.int32)
    ref_codes, ref_c0, ref_depth = map(np.asarray, _greedy_run(ref_params, cfg, prompt, none, jnp.array(False)))
    codes, c0, depth = map(np.asarray, _greedy_run(test_params, cfg, prompt, jnp.asarray(ref_codes), jnp.array(True)))
    free_codes = np.asarray(_greedy_run(test_params, cfg, prompt, none, jnp.array(False))[0])
    diverged = np.nonzero((free_codes != ref_codes).any(-1))[0]
    greedy = np.concatenate([c0[:, None, :MIMI_CODES], depth[..., :MIMI_CODES]], 1).argmax(-1)

    def err(a, b):
        return float(np.abs(a - b).max() / b.std()), float(np.sqrt(np.mean((a - b) ** 2)) / b.std())

    (c0_max, c0_rms), (d_max, d_rms) = err(c0, ref_c0), err(depth, ref_depth)
    return {"frames": num_frames, "code_agreement": float((greedy == ref_codes).mean()),
            "c0_agreement": float((greedy[:, 0] == ref_codes[:, 0]).mean()),
            "depth_agreement": float((greedy[:, 1:] == ref_codes[:, 1:]).mean()),
            "c0_logit_error": c0_max, "c0_logit_rms": c0_rms, "depth_logit_error": d_max, "depth_logit_rms": d_rms,
            "first_divergence": int(diverged[0]) if diverged.size else num_frames}


@partial(jax.jit, static_argnums=(1,))
def _greedy_run(params, cfg, prompt, forced, teacher_forced):
    """One stream: prompt (P,) text tokens, then F = len(forced) greedy frames, each fed back the codes
    `forced` (F, C) when `teacher_forced` (a traced bool: one compilation serves both), else its own.
    -> (greedy codes (F, C), c0 logits (F, V), depth logits (F, C - 1, V))."""
    from csm_jax import csm, llama

    C, P, F = cfg.num_codebooks, prompt.shape[0], forced.shape[0]
    dtype = params["c0_head"].dtype
    pick = lambda lg: jnp.argmax(lg[:, :csm.MIMI_CODES], -1).astype(jnp.int32)  # noqa: E731
    feed = lambda lg, f: jnp.where(teacher_forced, f, pick(lg))  # noqa: E731

    def frame(carry, f):
        cache, h, pos = carry
        lg0 = csm.backbone_logits(params, h)
        rest, lgs = csm.depth_decoder(cfg, params, h, feed(lg0, f[None, 0]), lambda lg, i: feed(lg, f[None, i]))
        codes = jnp.concatenate([pick(lg0)[:, None], pick_all(lgs)], 1)
        fed = jnp.concatenate([feed(lg0, f[None, 0])[:, None], rest], 1)
        row = jnp.concatenate([fed, jnp.zeros((1, 1), jnp.int32)], 1)[:, None]
        mask = jnp.concatenate([jnp.ones((1, 1, C), bool), jnp.zeros((1, 1, 1), bool)], -1)
        x = csm.embed_rows(cfg, params, row, mask).astype(dtype)
        out, cache = llama.forward(cfg.backbone, params["backbone"], x, pos[:, None], cache)
        return (cache, out[:, 0], pos + 1), (codes[0], lg0[0], lgs[0])

    def pick_all(lgs):
        return jnp.argmax(lgs[..., :csm.MIMI_CODES], -1).astype(jnp.int32)

    tokens = jnp.zeros((1, P, C + 1), jnp.int32).at[0, :, -1].set(prompt)
    mask = jnp.zeros((1, P, C + 1), bool).at[..., -1].set(True)
    x = csm.embed_rows(cfg, params, tokens, mask).astype(dtype)
    cache = llama.init_cache(cfg.backbone, 1, P + F, dtype)
    h, cache = llama.forward(cfg.backbone, params["backbone"], x, jnp.arange(P)[None], cache)
    return jax.lax.scan(frame, (cache, h[:, -1], jnp.full((1,), P, jnp.int32)), forced)[1]
