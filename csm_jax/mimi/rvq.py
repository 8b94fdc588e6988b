"""Mimi's split residual vector quantizer (moshi 0.2.2 `quantization/vq.py`, `core_vq.py`).

Two independent RVQs read the same latent z (B, T, 512):
  semantic ("first"): 1 codebook on in_first(z);
  acoustic ("rest"): up to 31 codebooks on in_rest(z) (NOT on the semantic residual), each stage
  quantizing what the previous stages left.
Codebooks E (C, 2048, 256) are embed_sum / max(cluster_usage, 1e-5), computed at load time.
Decoding sums the stages' vectors per quantizer, projects each with its output projection, and adds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _nearest(r, E):
    """r (B, T, 256), E (2048, 256) -> index of the nearest codeword (first on ties), as torch.cdist + argmin."""
    d = jnp.sum(r * r, -1, keepdims=True) - 2.0 * (r @ E.T) + jnp.sum(E * E, -1)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def encode(p, z, num_codebooks: int):
    """z (B, T, 512) -> codes (B, num_codebooks, T) int32."""
    r = z @ p["first"]["in"]
    codes = [_nearest(r, p["first"]["codebooks"][0])]
    if num_codebooks > 1:
        def stage(r, E):
            c = _nearest(r, E)
            return r - E[c], c

        _, rest = jax.lax.scan(stage, z @ p["rest"]["in"], p["rest"]["codebooks"][: num_codebooks - 1])
        codes += list(rest)
    return jnp.stack(codes, axis=1)


def decode(p, codes):
    """codes (B, n_q, T) -> latent (B, T, 512)."""
    n_q = codes.shape[1]
    out = p["first"]["codebooks"][0][codes[:, 0]] @ p["first"]["out"]
    if n_q > 1:
        books = p["rest"]["codebooks"][: n_q - 1]  # (n_q-1, 2048, 256)
        vecs = jax.vmap(lambda E, c: E[c], in_axes=(0, 1))(books, codes[:, 1:])  # (n_q-1, B, T, 256)
        out = out + jnp.sum(vecs, axis=0) @ p["rest"]["out"]
    return out
