"""Sampling as Sesame's csm/models.py `sample_topk`: top-k, then temperature, then a categorical draw.

Per-row arrays for temperature, top-k and PRNG keys, so changing them never recompiles. Temperature 0 is
greedy (argmax). The reference keeps every logit equal to the k-th largest (ties survive), and so do we.
Logits from `allowed` upward (the audio vocabulary's 2048..2050, which Mimi cannot decode) are never drawn.

The k-th largest logit is found without sorting the vocabulary (a sort of 2051 logits per row and codebook
was 7% of a batch-16 frame on XLA:CPU): `lax.top_k` when every row's k is at most 64 (the usual 50), else an
exact bisection over the logits' bit patterns. Both return exactly the value a sort would.

The categorical draw is jax.random.categorical's (argmax of logits plus Gumbel noise), with the noise made
ahead by `gumbel_noise`: a frame's 32 draws take their noise from one batched generation before the
codebook loop instead of one per sequential step, and the bits are the ones `jax.random.categorical(key, ...)`
would draw, so the codes are too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.named_scope("random_bits")
def gumbel_noise(keys, vocab: int):
    """keys (...) PRNG keys -> (..., vocab) fp32: the Gumbel noise `jax.random.categorical(key, logits)` adds to
    (vocab,) logits before its argmax, one row per key."""
    flat = keys.reshape(-1)
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,), jnp.float32))(flat)
    return noise.reshape(keys.shape + (vocab,))


@jax.named_scope("sampling")
def codebook_noise(frame_keys, codebooks: int, vocab: int):
    """frame_keys (B,) -> (B, codebooks, vocab): the noise of each row's draws for codebooks 0..codebooks-1,
    codebook i's drawn with fold_in(frame_key, i), all in one batched generation."""
    fold = jax.vmap(jax.vmap(jax.random.fold_in, in_axes=(None, 0)), in_axes=(0, None))
    return gumbel_noise(fold(frame_keys, jnp.arange(codebooks, dtype=jnp.int32)), vocab)


@jax.named_scope("sampling")
def sample(logits, noise, temperature, topk, allowed: int):
    """logits (B, V) fp32, noise (B, V) (`gumbel_noise` of each row's key), temperature (B,), topk (B,) int
    -> (B,) int32: as jax.random.categorical with that key over the top-k logits divided by the temperature."""
    V = logits.shape[-1]
    logits = jnp.where(jnp.arange(V) < allowed, logits.astype(jnp.float32), -jnp.inf)
    greedy = jnp.argmax(logits, -1)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    scaled = logits / t
    k = jnp.clip(topk, 1, allowed)
    kth = kth_largest(scaled, k)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    drawn = jnp.argmax(noise + scaled, axis=-1)
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


@jax.named_scope("top_k")
def kth_largest(x, k):
    """x (B, V) fp32 without NaN, k (B,) int in [1, V] -> (B, 1): each row's k-th largest value (ties counted)."""
    if x.shape[-1] <= _TOP_K_CAP:
        return jnp.take_along_axis(-jnp.sort(-x, axis=-1), (k - 1)[:, None], axis=-1)

    def small(x, k):
        # The barrier keeps XLA from folding a constant k's slice into the top-k, which turns it back into a sort.
        top = jax.lax.optimization_barrier(jax.lax.top_k(x, _TOP_K_CAP)[0])
        return jnp.take_along_axis(top, (k - 1)[:, None], axis=-1)

    return jax.lax.cond(jnp.max(k) <= _TOP_K_CAP, small, _kth_by_bisection, x, k)
