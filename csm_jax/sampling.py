"""Sampling as Sesame's csm/models.py `sample_topk`: top-k, then temperature, then a categorical draw.

Per-row arrays for temperature, top-k and PRNG keys, so changing them never recompiles. Temperature 0 is
greedy (argmax). The reference keeps every logit equal to the k-th largest (ties survive), and so do we.
Logits from `allowed` upward (the audio vocabulary's 2048..2050, which Mimi cannot decode) are never drawn.

The k-th largest logit is found without sorting the vocabulary (a sort of 2051 logits per row and codebook
was 7% of a batch-16 frame on XLA:CPU): `lax.top_k` when every row's k is at most 64 (the usual 50), else an
exact bisection over the logits' bit patterns. Both return exactly the value a sort would.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, keys, temperature, topk, allowed: int):
    """logits (B, V) fp32, keys (B,) PRNG keys, temperature (B,), topk (B,) int -> (B,) int32."""
    V = logits.shape[-1]
    logits = jnp.where(jnp.arange(V) < allowed, logits.astype(jnp.float32), -jnp.inf)
    greedy = jnp.argmax(logits, -1)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    k = jnp.clip(topk, 1, allowed)
    kth = kth_largest(scaled, k)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


_TOP_K_CAP = 64


def _sortable(x):
    """fp32 -> uint32 with the same order (-inf < ... < -0.0 < +0.0 < ... < inf)."""
    i = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(i >> 31 == 1, ~i, i | jnp.uint32(0x80000000))


def _from_sortable(u):
    return jax.lax.bitcast_convert_type(jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u), jnp.float32)


def _kth_by_bisection(x, k):
    """The largest t (as a sortable bit pattern) with count(x >= t) >= k, decided bit by bit from the top."""
    keys = _sortable(x)

    def bit(b, t):
        cand = t | (jnp.uint32(1) << (31 - b).astype(jnp.uint32))
        enough = jnp.sum(keys >= cand, axis=-1, keepdims=True) >= k[:, None]
        return jnp.where(enough, cand, t)

    t = jax.lax.fori_loop(0, 32, bit, jnp.zeros(x.shape[:-1] + (1,), jnp.uint32))
    return _from_sortable(t)


def kth_largest(x, k):
    """x (B, V) fp32 without NaN, k (B,) int in [1, V] -> (B, 1): each row's k-th largest value (ties counted)."""
    if x.shape[-1] <= _TOP_K_CAP:
        return jnp.take_along_axis(-jnp.sort(-x, axis=-1), (k - 1)[:, None], axis=-1)

    def small(x, k):
        # The barrier keeps XLA from folding a constant k's slice into the top-k, which turns it back into a sort.
        top = jax.lax.optimization_barrier(jax.lax.top_k(x, _TOP_K_CAP)[0])
        return jnp.take_along_axis(top, (k - 1)[:, None], axis=-1)

    return jax.lax.cond(jnp.max(k) <= _TOP_K_CAP, small, _kth_by_bisection, x, k)
