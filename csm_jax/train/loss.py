"""CSM's training loss, as transformers' CsmForConditionalGeneration computes it, on our parameter pytree.

A batch is rows as the generator builds them (tokens, mask (B, S, 33)) plus labels (B, S, 32): the target
codes of each audio row (frames and the all-zero end-of-audio row), -100 elsewhere (text, padding, audio
that is only context). Then
  backbone loss = mean over labelled rows t >= 1 of CE(c0_head · h[t-1], labels[t, 0])
  depth loss    = mean over the chosen frames f and codebooks i = 1..31 of CE(head[i-1] · d_f[i], labels[f, i])
where d_f is the depth decoder over [proj(h[f-1]), proj(audio_embed[labels[f, 0..30]])] at positions 0..31
(teacher forcing; position i predicts codebook i). loss = backbone loss + depth loss.

Compute amortization (Sesame's recipe; transformers' processor `depth_decoder_labels_ratio`): the depth
decoder trains on a random part of the frames only. The chosen frames come as `depth_rows` (F, 2) = (batch
row, position) with `depth_valid` (F,); F is static, so one compiled program serves every draw.

Unlike the generator (`llama.forward` over a KV cache) training runs each transformer once over the whole
sequence with a causal mask: same parameters, same math, no cache. Axes as in llama.py; F chosen frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from csm_jax.csm import CsmConfig, embed_rows
from csm_jax.llama import LlamaConfig, linear, rms_norm, rope, rope_frequencies
from csm_jax.train.lora import project

IGNORE = -100


def _layer(cfg: LlamaConfig, p, lo, scale, x, pos, inv_freq):
    B, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    qkv = project(cfg, n, p["wqkv"], "wqkv", lo, scale)
    q = rope(qkv[..., : N * H].reshape(B, T, N, H), pos, inv_freq)
    k = rope(qkv[..., N * H:(N + K) * H].reshape(B, T, K, H), pos, inv_freq)
    v = qkv[..., (N + K) * H:].reshape(B, T, K, H)
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(B, T, N * H)
    x = x + project(cfg, a, p["wo"], "wo", lo, scale)
    m = project(cfg, rms_norm(x, p["mlp_norm"], cfg.norm_eps), p["w13"], "w13", lo, scale)
    gate, up = jnp.split(m, 2, axis=-1)
    h = jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up
    return x + project(cfg, h, p["w2"], "w2", lo, scale)


def transformer(cfg: LlamaConfig, params: dict, x, lora: list | None = None, scale: float = 1.0,
                remat: bool = False):
    """x (B, T, D) at positions 0..T-1, causal -> final-normed hidden (B, T, D). `remat` recomputes each
    layer's activations in the backward pass (memory for compute, for long sequences at full size)."""
    B, T, _ = x.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    inv_freq = rope_frequencies(cfg)
    layer = jax.checkpoint(_layer, static_argnums=(0, 3)) if remat else _layer
    for i, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer{i}"):
            x = layer(cfg, p, lora[i] if lora else None, scale, x, pos, inv_freq)
    return rms_norm(x, params["norm"], cfg.norm_eps)


def cross_entropy(logits, labels):
    """Summed CE over labels != IGNORE, and their count. logits (..., V) fp32, labels (...) int."""
    valid = labels != IGNORE
    safe = jnp.where(valid, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, lse - picked, 0.0)), jnp.sum(valid)


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def csm_loss(params: dict, cfg: CsmConfig, batch: dict, lora: dict | None = None, lora_scale: float = 1.0,
             compute_dtype=jnp.float32, remat: bool = False):
    """-> (loss, {"loss", "backbone_loss", "depth_loss", "backbone_tokens", "depth_tokens"}).

    batch: tokens (B, S, 33) int32, mask (B, S, 33) bool, labels (B, S, 32) int32 (IGNORE = no target),
    depth_rows (F, 2) int32, depth_valid (F,) bool. Parameters may be fp32 masters: the transformers run in
    `compute_dtype` (embedding rows are gathered before the cast), losses in fp32.
    """
    C, V = cfg.num_codebooks, cfg.audio_vocab_size
    tokens, mask, labels = batch["tokens"], batch["mask"], batch["labels"]
    lo_b = lora["backbone"] if lora else None
    lo_d = lora["decoder"] if lora else None
    with jax.named_scope("backbone"):
        x = embed_rows(cfg, params, tokens, mask).astype(compute_dtype)
        h = transformer(cfg.backbone, _cast(params["backbone"], compute_dtype), x, lo_b, lora_scale, remat)
        logits = linear(h[:, :-1], params["c0_head"].astype(compute_dtype), jnp.float32)  # (B, S-1, V)
        b_sum, b_n = cross_entropy(logits, labels[:, 1:, 0])
    with jax.named_scope("depth_decoder"):
        rows = batch["depth_rows"]
        codes = labels[rows[:, 0], rows[:, 1]]  # (F, C)
        codes = jnp.where(batch["depth_valid"][:, None], codes, IGNORE)
        h_prev = h[rows[:, 0], rows[:, 1] - 1]  # (F, D): the backbone state the frame was predicted from
        offsets = jnp.arange(C - 1, dtype=jnp.int32) * V
        emb = params["audio_embed"][jnp.maximum(codes[:, :-1], 0) + offsets].astype(compute_dtype)
        x = linear(jnp.concatenate([h_prev[:, None], emb], 1), params["projection"].astype(compute_dtype))
        d = transformer(cfg.decoder, _cast(params["decoder"], compute_dtype), x, lo_d, lora_scale, remat)
        heads = jnp.stack(params["audio_head"]).astype(compute_dtype)  # (C-1, V, Dd)
        d_logits = jnp.einsum("fcd,cvd->fcv", d[:, 1:], heads, preferred_element_type=jnp.float32)
        d_sum, d_n = cross_entropy(d_logits, codes[:, 1:])
    backbone_loss = b_sum / jnp.maximum(b_n, 1)
    depth_loss = d_sum / jnp.maximum(d_n, 1)
    loss = backbone_loss + depth_loss
    return loss, {"loss": loss, "backbone_loss": backbone_loss, "depth_loss": depth_loss,
                  "backbone_tokens": b_n, "depth_tokens": d_n}
