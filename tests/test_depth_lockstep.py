"""The depth decoder's lockstep transformer (`llama.forward_shared`: one position for every row, in-place
cache writes, mask from the position, RoPE from a table) equals the per-row-position `llama.forward` run over
the whole sequence at once. `forward` itself is checked against transformers in test_csm_parity.py."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from csm_jax import llama
from csm_jax.csm import CsmConfig, init_params

pytestmark = pytest.mark.slow  # every test here takes tens of seconds on 2 cores


def test_lockstep_decode_equals_full_forward():
    cfg = CsmConfig.csm_1b().decoder
    cfg = llama.LlamaConfig(2, 256, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 256, max_seq_len=32)  # 8/2 heads
    params = init_params(CsmConfig(backbone=CsmConfig.tiny().backbone, decoder=cfg), jax.random.key(3))["decoder"]
    B, S = 3, 32
    x = jax.random.normal(jax.random.key(4), (B, S, cfg.dim))
    pos = jnp.broadcast_to(jnp.arange(S), (B, S))
    full, _ = llama.forward(cfg, params, x, pos, llama.init_cache(cfg, B, S, x.dtype))
    kv, table = llama.init_shared_cache(cfg, B, S, x.dtype), llama.rope_table(cfg, S)
    step = jax.jit(llama.forward_shared, static_argnums=0)
    out, kv = step(cfg, params, x[:, :2], 0, kv, table)  # two positions at once, as the decoder starts
    outs = [out]
    for i in range(2, S):  # then one at a time, the position traced
        out, kv = step(cfg, params, x[:, i:i + 1], jnp.int32(i), kv, table)
        outs.append(out)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full), rtol=0, atol=1e-5)
