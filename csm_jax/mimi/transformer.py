"""Mimi's encoder/decoder transformer (moshi 0.2.2 `modules/transformer.py`, Mimi settings).

8 pre-norm layers at 25 Hz, width D=512, N=8 heads of H=64, no final norm:
  x = x + ls1 * Wo · Attn(RoPE(q), RoPE(k), v)     q, k, v = LayerNorm1(x) · Wq, Wk, Wv
  x = x + ls2 * W2 · gelu_erf(W1 · LayerNorm2(x))
RoPE rotates interleaved pairs (x[2i], x[2i+1]) at absolute positions (the checkpoint's native layout);
attention is causal with a sliding window: key s is visible to query t iff 0 <= pos_t - pos_s < 250.

One-shot attention over more than 2 * CONTEXT steps (20 s) runs in blocks of CONTEXT queries, each against
its own block and the one before (the window needs at most CONTEXT - 1 earlier keys): scores take
O(T * CONTEXT) memory instead of the O(T^2) of a full (T, T) product, which for 10 minutes (T = 15,000) was
7 GB per layer.

Streaming keeps a ring of RING (256) keys/values per layer with the absolute position each cell holds
(-1 = empty). A step writes its new keys into the ring, then attends to the cells of each query's window: the
ring holds a whole window besides a step's new keys, so a step of several time steps sees exactly the window
a one-shot pass sees. The rings are most of a stream's state: a step writes its cells in place and reads them
where they lie, never copying them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NUM_HEADS = 8
CONTEXT = 250
RING = 256  # cells of a streaming ring: a 250-step window and a step's new keys (up to 7 steps)
MAX_PERIOD = 10_000.0


def layer_norm(p, x, eps=1e-5):
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mu).mean(-1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]).astype(x.dtype)


def rope_interleaved(x, pos):
    """x (B, T, N, H), pos (B, T) absolute positions -> rotated pairs (x[2i], x[2i+1])."""
    H = x.shape[-1]
    freqs = jnp.exp(jnp.arange(H // 2, dtype=jnp.float32) * (-math.log(MAX_PERIOD) * 2 / H))
    ang = pos.astype(jnp.float32)[:, :, None, None] * freqs  # (B, T, 1, H/2)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xr = x.astype(jnp.float32).reshape(*x.shape[:-1], H // 2, 2)
    re, im = xr[..., 0], xr[..., 1]
    out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _attend(q, k, v, pos_q, pos_k):
    """q (B, T, N, H), k/v (B, S, N, H), pos_q (B, T), pos_k (B, S) -> (B, T, N*H)."""
    B, T, N, H = q.shape
    delta = pos_q[:, :, None] - pos_k[:, None, :]
    visible = (pos_k[:, None, :] >= 0) & (delta >= 0) & (delta < CONTEXT)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / math.sqrt(H)
    logits = jnp.where(visible[:, None], logits.astype(jnp.float32), -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", w, v).reshape(B, T, N * H)


def _attend_blocks(q, k, v, pos):
    """One-shot `_attend` for consecutive positions (pos[:, t] = pos[:, 0] + t), in blocks of CONTEXT queries.

    Block c's queries see keys of blocks c - 1 and c only, which holds every key of their window; the mask
    is still built from positions, so the visible keys are exactly those of the full product. -> (B, T, N*H).
    """
    B, T, N, H = q.shape
    Q = CONTEXT
    n = -(-T // Q)
    pad = ((0, 0), (0, n * Q - T), (0, 0), (0, 0))
    qb, kb, vb = (jnp.pad(a, pad).reshape(B, n, Q, N, H) for a in (q, k, v))
    pb = jnp.pad(pos, ((0, 0), (0, n * Q - T)), constant_values=-1).reshape(B, n, Q)

    def with_previous(a, fill):  # (B, n, Q, ...) -> (B, n, 2Q, ...): block c - 1 then block c
        prev = jnp.concatenate([jnp.full_like(a[:, :1], fill), a[:, :-1]], axis=1)
        return jnp.concatenate([prev, a], axis=2)

    ks, vs, ps = with_previous(kb, 0), with_previous(vb, 0), with_previous(pb, -1)
    delta = pb[:, :, :, None] - ps[:, :, None, :]  # (B, n, Q, 2Q)
    visible = (ps[:, :, None, :] >= 0) & (delta >= 0) & (delta < CONTEXT)
    logits = jnp.einsum("bcqnh,bcsnh->bcnqs", qb, ks) / math.sqrt(H)
    logits = jnp.where(visible[:, :, None], logits.astype(jnp.float32), -jnp.inf)
    # Padding queries (pos -1) see nothing: zeros rather than NaN, then dropped.
    w = jnp.nan_to_num(jax.nn.softmax(logits, axis=-1)).astype(v.dtype)
    out = jnp.einsum("bcnqs,bcsnh->bcqnh", w, vs).reshape(B, n * Q, N * H)
    return out[:, :T]


def _attend_ring(q, k, v, pos, ring, active):
    """Streaming attention: the new keys and values are written into the ring in place first (an inactive
    row's writes go out of range and are dropped), then every query attends to the ring's cells whose
    positions are in its window. The ring has room for a step's keys beside a whole window (RING >= CONTEXT +
    T - 1), so a write never overwrites a key a query of the same step still sees, and the keys each query
    sees are those of the one-shot pass. The rings (most of a stream's state) are read where they lie: never
    copied, nor transposed (they are stored heads first, as the products read them).
    -> (out (B, T, N*H), ring)."""
    B, T, N, H = q.shape
    ck, cv, cpos = ring
    S = ck.shape[2]
    if T > S - CONTEXT + 1:
        raise ValueError(f"a streaming step of {T} steps needs a ring of at least {CONTEXT + T - 1} cells, not {S}")
    cells = pos % S if active is None else jnp.where(active[:, None], pos % S, S)  # (B, T); S: dropped
    rows = jnp.arange(B)[:, None]
    at = rows[:, :, None], jnp.arange(N)[None, :, None], cells[:, None, :]
    ck = ck.at[at].set(jnp.swapaxes(k, 1, 2).astype(ck.dtype), mode="drop")
    cv = cv.at[at].set(jnp.swapaxes(v, 1, 2).astype(cv.dtype), mode="drop")
    cpos = cpos.at[rows, cells].set(pos, mode="drop")
    delta = pos[:, :, None] - cpos[:, None, :]
    visible = (cpos[:, None, :] >= 0) & (delta >= 0) & (delta < CONTEXT)
    logits = jnp.einsum("btnh,bnsh->bnts", q, ck) / math.sqrt(H)
    # A finite floor, not -inf: an inactive row of an empty ring (a free slot) sees no cell, and its output,
    # unused, stays finite instead of NaN; a row that sees a cell gets exactly the weights -inf gives (exp -> 0).
    logits = jnp.where(visible[:, None], logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    w = jax.nn.softmax(logits, axis=-1).astype(cv.dtype)
    return jnp.einsum("bnts,bnsh->btnh", w, cv).reshape(B, T, N * H), (ck, cv, cpos)


def _layer(p, x, pos, cache=None, active=None):
    B, T, D = x.shape
    h = layer_norm(p["norm1"], x)
    q = (h @ p["wq"]).reshape(B, T, NUM_HEADS, -1)
    k = (h @ p["wk"]).reshape(B, T, NUM_HEADS, -1)
    v = (h @ p["wv"]).reshape(B, T, NUM_HEADS, -1)
    q, k = rope_interleaved(q, pos), rope_interleaved(k, pos)
    if cache is None:
        # Up to two windows the full (T, T) product is no larger than the blocks' (T, 2 * CONTEXT).
        a = _attend(q, k, v, pos, pos) if T <= 2 * CONTEXT else _attend_blocks(q, k, v, pos)
        new_cache = None
    else:
        a, new_cache = _attend_ring(q, k, v, pos, cache, active)
    x = x + p["ls1"] * (a @ p["wo"])
    h = layer_norm(p["norm2"], x)
    x = x + p["ls2"] * (jax.nn.gelu(h @ p["w1"], approximate=False) @ p["w2"])
    return x, new_cache


@jax.named_scope("transformer")
def transformer(layers, x, pos, caches=None, active=None):
    """x (B, T, D) at positions pos (B, T). caches: per-layer (k, v, pos) rings, or None for one-shot (then
    positions must be consecutive along T, as an unbroken clip's are). `active` (B,) bool: rows whose rings
    take the new steps (None: all); the others' rings are left as they were (their outputs are meaningless)."""
    new = []
    for i, p in enumerate(layers):
        with jax.named_scope(f"layer{i}"):
            x, c = _layer(p, x, pos, None if caches is None else caches[i], active)
        new.append(c)
    return x, (None if caches is None else new)


def init_caches(layers, batch, dtype=jnp.float32):
    """Empty streaming rings, one (k, v, pos) per layer: k, v (B, N, RING, H), pos (B, RING) = -1."""
    H = layers[0]["wq"].shape[1] // NUM_HEADS
    shape = (batch, NUM_HEADS, RING, H)  # separate buffers: the state is donated leaf by leaf
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((batch, RING), -1, jnp.int32))
            for _ in layers]
