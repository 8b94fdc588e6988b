"""The Llama transformer both halves of CSM share (torchtune llama3_2 as used by Sesame's csm/models.py).

Pre-norm layers, no biases, no embedding or output layer (CSM supplies its own):
  h = x + Wo · Attn(RoPE(Wq · n), RoPE(Wk · n), Wv · n)     n = RMSNorm_attn(x)
  y = h + W2 · (silu(W1 · m) * (W3 · m))                    m = RMSNorm_mlp(h)
  out = RMSNorm_final(y of the last layer)
GQA: query head n reads kv head n // (N / K). RoPE uses Llama-3 frequency scaling and the half-split
("rotate_half") pairing of transformers' layout; Sesame's interleaved q/k rows are permuted at load.

Axes: B batch, T new positions, S cache cells, N query heads, K kv heads, G = N/K, H head dim, D width,
M MLP width.
Attention always runs against an explicit cache. `forward` (per-row positions: the backbone) uses
{k, v: (B, K, S, H), pos: (B, S)} holding the absolute position of each cell (-1 = empty): new keys are
written at cell pos % S first, then every query attends to the cells whose position is <= its own.
`forward_shared` (one position for every row: the depth decoder) uses {k, v} whose cell s holds position s,
written in place at the shared position, with a mask from the position alone and RoPE angles from a table.
RoPE, norms and softmax run in fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from csm_jax.quantize import Int8Weight


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    # Llama-3 scaling as (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings);
    # (32, 1, 4, 8192) are torchtune's values, transformers' config writes an equivalent rescaled form.
    rope_scaling: tuple[float, float, float, float] | None = (32.0, 1.0, 4.0, 8192.0)
    max_seq_len: int = 2048

    @staticmethod
    def from_hf(c: dict) -> "LlamaConfig":
        rs = c.get("rope_scaling") or c.get("rope_parameters")
        kind = (rs or {}).get("rope_type", (rs or {}).get("type"))
        if kind not in ("llama3", "default", None):
            raise ValueError(f"unsupported rope_scaling type {kind!r}; CSM uses 'llama3'")
        # transformers 5.x writes rope_parameters {"rope_type": "default"} for a config saved without any
        # scaling: that is an absence, not a choice (the caller substitutes Sesame's scaling).
        scaling = None if not rs or kind == "default" or "factor" not in rs else (
            float(rs["factor"]), float(rs["low_freq_factor"]), float(rs["high_freq_factor"]),
            float(rs["original_max_position_embeddings"]))
        theta = c.get("rope_theta", (rs or {}).get("rope_theta", 500_000.0))
        return LlamaConfig(num_layers=c["num_hidden_layers"], dim=c["hidden_size"], num_heads=c["num_attention_heads"],
                           num_kv_heads=c["num_key_value_heads"],
                           head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                           ffn_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-5),
                           rope_theta=float(theta), rope_scaling=scaling,
                           max_seq_len=c.get("max_position_embeddings", 2048))


def rope_frequencies(cfg: LlamaConfig) -> jnp.ndarray:
    """Inverse frequencies (H/2,) in fp32, with Llama-3 scaling (torchtune Llama3ScaledRoPE / HF 'llama3')."""
    H = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    if cfg.rope_scaling is None:
        return inv
    factor, low, high, old_ctx = cfg.rope_scaling
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - low) / (high - low)
    scaled = jnp.where(wavelen > old_ctx / low, inv / factor, (1 - smooth) * inv / factor + smooth * inv)
    return jnp.where(wavelen < old_ctx / high, inv, scaled)


def rope_angles(pos, inv_freq):
    """pos (B, T) -> (cos, sin), each (B, T, 1, H/2) fp32."""
    ang = pos.astype(jnp.float32)[:, :, None, None] * inv_freq
    return jnp.cos(ang), jnp.sin(ang)


def rope_table(cfg: LlamaConfig, size: int):
    """(cos, sin) of positions 0..size-1, each (1, size, 1, H/2): read by position (`forward_shared`) instead
    of computed at every step."""
    return rope_angles(jnp.arange(size, dtype=jnp.int32)[None], rope_frequencies(cfg))


def rotate(x, cos, sin):
    """x (B, T, heads, H) rotated in half-split pairs (x[i], x[i + H/2]) by angles given as cos, sin."""
    x32 = x.astype(jnp.float32)
    a, b = jnp.split(x32, 2, axis=-1)
    return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(x.dtype)


def rope(x, pos, inv_freq):
    """x (B, T, heads, H), pos (B, T) -> rotated in half-split pairs (x[i], x[i + H/2])."""
    return rotate(x, *rope_angles(pos, inv_freq))


def linear(x, w, out_dtype=None):
    """x (..., in) times a weight stored as (out, in), PyTorch's layout. XLA:CPU runs this contraction
    1.6x faster than x @ w_(in, out) at batch 16 (and no slower at batch 1).

    `w` may be an int8 `Int8Weight` (csm_jax.quantize): x · q^T accumulates in fp32 with q converted to x's
    dtype inside the product (XLA fuses the conversion: only the int8 bytes are read), then each output
    channel is multiplied by its scale."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if isinstance(w, Int8Weight):
        y = jax.lax.dot_general(x, w.q.astype(x.dtype), dims, preferred_element_type=jnp.float32)
        return (y * w.scale.astype(jnp.float32)).astype(out_dtype or x.dtype)
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype)


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def init_cache(cfg: LlamaConfig, batch: int, size: int, dtype) -> dict:
    """An empty cache of `size` cells: {"k": [...], "v": [...] per layer (B, K, S, H), "pos": (B, S)}.
    Batch and kv-head lead so that the attention products read the cache in place (with (B, S, K, H) XLA
    copied the whole window into that order, per layer and step)."""
    shape = (batch, cfg.num_kv_heads, size, cfg.head_dim)
    return {"k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            "pos": jnp.full((batch, size), -1, jnp.int32)}


def init_shared_cache(cfg: LlamaConfig, batch: int, size: int, dtype) -> dict:
    """An empty cache of `size` cells for `forward_shared`: {"k": [...], "v": [...] per layer (B * K, S, H)},
    cell s = position s. Batch and kv head are one axis, the attention products' batch axis: the products
    read the cache in the shape it is stored and written in (with (B, K, S, H) at batch 1, XLA:CPU wrote
    each new key twice, once into a copy of the cache for the product; it still does when B * K = 1)."""
    shape = (batch * cfg.num_kv_heads, size, cfg.head_dim)
    return {"k": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)],
            "v": [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]}


def attention_windows(size: int) -> tuple[int, ...]:
    """The attention windows a cache of `size` cells is read through: powers of two from 128, then the whole
    cache. Each call picks, on the device, the smallest that holds every position it attends to."""
    out, w = [], 128
    while w < size:
        out.append(w)
        w *= 2
    return (*out, size)


def _attend(q, k_cache, v_cache, cache_pos, pos, rows, window: int):
    """q (R, T, K, G, H) against the first `window` cells of the cache rows `rows` (R,), or of every row
    when `rows` is None -> (R, T, N * H)."""
    R, T, K, G, H = q.shape
    pick = (slice(None),) if rows is None else (rows,)
    ks, vs, ps = k_cache[pick][:, :, :window], v_cache[pick][:, :, :window], cache_pos[pick][:, :window]
    logits = jnp.einsum("btkgh,bksh->bkgts", q, ks, preferred_element_type=jnp.float32) / math.sqrt(H)
    visible = (ps[:, None, :] >= 0) & (ps[:, None, :] <= pos[:, :, None])  # (R, T, S)
    logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1)
    # Padding queries (pos -1) see nothing; give them zeros rather than NaN.
    w = jnp.where(jnp.isnan(w), 0.0, w).astype(v_cache.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", w, vs).reshape(R, T, K * G * H)


def _qkv(cfg, p, x):
    """x (R, T, D) -> q (R, T, N, H), k and v (R, T, K, H), before RoPE."""
    R, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qkv = linear(x, p["wqkv"])
    return (qkv[..., : N * H].reshape(R, T, N, H), qkv[..., N * H:(N + K) * H].reshape(R, T, K, H),
            qkv[..., (N + K) * H:].reshape(R, T, K, H))


@jax.named_scope("mlp")
def _mlp(cfg, p, x):
    """The feed-forward branch of a layer: W2 · (silu(W1 · m) * (W3 · m)), m = RMSNorm_mlp(x)."""
    m = linear(rms_norm(x, p["mlp_norm"], cfg.norm_eps), p["w13"])
    gate, up = jnp.split(m, 2, axis=-1)
    return linear(jax.nn.silu(gate.astype(jnp.float32)).astype(x.dtype) * up, p["w2"])


@jax.named_scope("attention")
def _attention(cfg, p, x, pos, rows, cells, cache_pos, k_cache, v_cache, inv_freq, window_index):
    R, T, _ = x.shape
    N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = _qkv(cfg, p, x)
    q, k = rope(q, pos, inv_freq), rope(k, pos, inv_freq)
    at = (jnp.arange(R) if rows is None else rows)[:, None, None], jnp.arange(K)[None, :, None], cells[:, None, :]
    k_cache = k_cache.at[at].set(jnp.swapaxes(k, 1, 2).astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[at].set(jnp.swapaxes(v, 1, 2).astype(v_cache.dtype), mode="drop")
    q = q.reshape(R, T, K, N // K, H)
    windows = attention_windows(k_cache.shape[2])
    # The cache is only read inside the branches (written above): no branch copies it.
    branches = [lambda q, kc, vc, cp, w=w: _attend(q, kc, vc, cp, pos, rows, w) for w in windows]
    out = jax.lax.switch(window_index, branches, q, k_cache, v_cache, cache_pos)
    return linear(out, p["wo"]), k_cache, v_cache


@jax.named_scope("transformer")
def forward(cfg: LlamaConfig, params: dict, x, pos, cache: dict, rows=None):
    """x (R, T, D) at absolute positions pos (R, T) (-1 = padding: not written, output meaningless), against
    the cache rows `rows` (R,) int (distinct; default: all rows, R = the cache's batch). Only those rows of
    the cache are read and written: a few busy rows of a large batch cost their own compute, not the batch's.

    Attention reads only the cache cells below the smallest window (`attention_windows`) holding every
    position of the call, chosen on the device from `pos`: valid while cell == position (the ring has not
    wrapped), which holds because generation stops at the cache's capacity; a wrapped position selects the
    whole cache.

    Returns (final-normed hidden (R, T, D), updated cache). Layers are unrolled: on XLA:CPU this runs
    3x faster than a scan over stacked layer weights.
    """
    size = cache["pos"].shape[1]
    cells = jnp.where(pos >= 0, pos % size, size)  # ring cell of each position; out of range = dropped write
    cache_pos = cache["pos"].at[(jnp.arange(x.shape[0]) if rows is None else rows)[:, None], cells].set(
        pos, mode="drop")
    windows = attention_windows(size)
    window_index = jnp.sum(jnp.max(pos) + 1 > jnp.array(windows[:-1], jnp.int32)) if len(windows) > 1 else 0
    inv_freq = rope_frequencies(cfg)
    ks, vs = [], []
    for i, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer{i}"):
            a, k_i, v_i = _attention(cfg, p, rms_norm(x, p["attn_norm"], cfg.norm_eps), pos, rows, cells, cache_pos,
                                     cache["k"][i], cache["v"][i], inv_freq, window_index)
            x = x + a
            x = x + _mlp(cfg, p, x)
            ks.append(k_i)
            vs.append(v_i)
    return rms_norm(x, params["norm"], cfg.norm_eps), {"k": ks, "v": vs, "pos": cache_pos}


@jax.named_scope("attention")
def _attention_shared(cfg, p, x, start, k_cache, v_cache, cos, sin, visible):
    """`_attention` at the shared position `start` against caches (B * K, S, H); queries and keys are put
    in that order, so each product runs over the B * K (kv head) axis with the G query heads and T
    positions of a kv head as its rows."""
    R, T, _ = x.shape
    K, G, H = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    q, k, v = _qkv(cfg, p, x)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    # (R, T, K, ..., H) -> (R * K, T * ..., H)
    by_kv_head = lambda a: jnp.swapaxes(a, 1, 2).reshape(R * K, -1, H)  # noqa: E731
    at = (0, start, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, by_kv_head(k).astype(k_cache.dtype), at)
    v_cache = jax.lax.dynamic_update_slice(v_cache, by_kv_head(v).astype(v_cache.dtype), at)
    q = by_kv_head(q.reshape(R, T, K, G, H))  # rows (t, g)
    logits = jnp.einsum("bqh,bsh->bqs", q, k_cache, preferred_element_type=jnp.float32) / math.sqrt(H)
    w = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bqs,bsh->bqh", w, v_cache).reshape(R, K, T, G * H)
    return linear(jnp.swapaxes(out, 1, 2).reshape(R, T, K * G * H), p["wo"]), k_cache, v_cache


@jax.named_scope("transformer")
def forward_shared(cfg: LlamaConfig, params: dict, x, start, kv: dict, table):
    """x (B, T, D) at positions start .. start + T - 1, the same for every row (`start` an int32 scalar, may
    be traced), against keys and values `kv` (`init_shared_cache`) whose cell s holds position s. `table` is
    `rope_table(cfg, S)`. Returns (final-normed hidden (B, T, D), updated kv).

    `forward` for a batch in lockstep (the depth decoder: every row at codebook i): the new keys and values
    are written in place at cell `start` (a dynamic-update-slice, no scatter), a query at position t sees
    cells 0..t (a mask from an iota, no positions stored), and RoPE reads its angles from `table`.
    Positions must stay below S (nothing wraps)."""
    T, S = x.shape[1], kv["k"][0].shape[-2]
    cos, sin = (jax.lax.dynamic_slice_in_dim(t, start, T, axis=1) for t in table)
    G = cfg.num_heads // cfg.num_kv_heads
    t = start + jnp.arange(T)[:, None]  # query rows (t, g), as `_attention_shared` orders them
    visible = jnp.repeat(jnp.arange(S)[None, :] <= t, G, axis=0)[None]  # (1, T * G, S)
    ks, vs = [], []
    for i, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer{i}"):
            a, k_i, v_i = _attention_shared(cfg, p, rms_norm(x, p["attn_norm"], cfg.norm_eps), start,
                                            kv["k"][i], kv["v"][i], cos, sin, visible)
            x = x + a
            x = x + _mlp(cfg, p, x)
            ks.append(k_i)
            vs.append(v_i)
    return rms_norm(x, params["norm"], cfg.norm_eps), {"k": ks, "v": vs}


def param_shapes(cfg: LlamaConfig) -> dict:
    """Shapes of one transformer's parameters (weights (out, in) as in PyTorch; q|k|v and gate|up fused)."""
    D, N, K, H, M = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    layer = {"attn_norm": (D,), "wqkv": ((N + 2 * K) * H, D), "wo": (D, N * H), "mlp_norm": (D,),
             "w13": (2 * M, D), "w2": (D, M)}
    return {"layers": [dict(layer) for _ in range(cfg.num_layers)], "norm": (D,)}
