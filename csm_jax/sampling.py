"""Sampling as Sesame's csm/models.py `sample_topk`: top-k, then temperature, then a categorical draw.

Per-row arrays for temperature, top-k and PRNG keys, so changing them never recompiles. Temperature 0 is
greedy (argmax). The reference keeps every logit equal to the k-th largest (ties survive), and so do we.
Logits from `allowed` upward (the audio vocabulary's 2048..2050, which Mimi cannot decode) are never drawn.
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
    kth = jnp.take_along_axis(-jnp.sort(-scaled, axis=-1), (k - 1)[:, None], axis=-1)
    scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
