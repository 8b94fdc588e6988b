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


def _nearest(r, E, candidates: int = 8):
    """r (B, T, 256), E (2048, 256) -> index of the nearest codeword (lowest index on exact ties).

    |r|^2 - 2 r.e + |e|^2 cancels badly in fp32 when r lies close to a codeword (the distance is far smaller
    than |r|^2), enough to pick a codeword 1e-4 farther. So the matmul form only shortlists `candidates`,
    whose distances are then computed directly as sum((r - e)^2).
    """
    approx = jnp.sum(E * E, -1) - 2.0 * (r @ E.T)  # (B, T, 2048); |r|^2 is the same for every codeword
    _, idx = jax.lax.top_k(-approx, candidates)  # (B, T, k)
    exact = jnp.sum(jnp.square(r[..., None, :] - E[idx]), -1)
    best = jnp.min(exact, -1, keepdims=True)
    return jnp.min(jnp.where(exact == best, idx, E.shape[0]), -1).astype(jnp.int32)


@jax.named_scope("rvq_encode")
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


@jax.named_scope("rvq_decode")
def decode(p, codes):
    """codes (B, n_q, T) -> latent (B, T, 512)."""
    n_q = codes.shape[1]
    out = p["first"]["codebooks"][0][codes[:, 0]] @ p["first"]["out"]
    if n_q > 1:
        books = p["rest"]["codebooks"][: n_q - 1]  # (n_q-1, 2048, 256)
        vecs = jax.vmap(lambda E, c: E[c], in_axes=(0, 1))(books, codes[:, 1:])  # (n_q-1, B, T, 256)
        out = out + jnp.sum(vecs, axis=0) @ p["rest"]["out"]
    return out
