"""The shared Llama (csm_jax/llama.py) against transformers' LlamaModel, and reading RoPE settings from config.json.

Tolerances (fp32): inverse frequencies within 1e-6 relative; hidden states within 1e-4 of the reference's
largest magnitude.
"""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp

from csm_jax import llama
from csm_jax.csm import CsmConfig
from csm_jax.testing.tiny_csm import BACKBONE_ROPE, DECODER_ROPE

TORCHTUNE = (32.0, 1.0, 4.0, 8192.0)  # torchtune Llama3ScaledRoPE defaults, which Sesame's models use


def _hf_inv_freq(rope: dict, head_dim: int) -> np.ndarray:
    from transformers import LlamaConfig as HfLlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    c = HfLlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=8192, rope_parameters=dict(rope, rope_theta=500000.0))
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](c, "cpu")
    return inv.numpy()


@pytest.mark.parametrize("rope,head_dim", [(BACKBONE_ROPE, 64), (DECODER_ROPE, 128)])
def test_rope_frequencies_match_transformers(rope, head_dim):
    cfg = llama.LlamaConfig.from_hf({"num_hidden_layers": 1, "hidden_size": 4 * head_dim, "num_attention_heads": 4,
                                     "num_key_value_heads": 1, "head_dim": head_dim, "intermediate_size": 8,
                                     "rope_parameters": dict(rope, rope_theta=500000)})
    ours = np.asarray(llama.rope_frequencies(cfg))
    ref = _hf_inv_freq(rope, head_dim)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    # csm-1b's config.json writes torchtune's scaling in a rescaled but equivalent form.
    tt = llama.rope_frequencies(llama.LlamaConfig(1, 4 * head_dim, 4, 1, head_dim, 8, rope_scaling=TORCHTUNE))
    np.testing.assert_allclose(np.asarray(tt), ref, rtol=1e-6)


def _csm1b_like(rope_key: str | None, backbone_rope=BACKBONE_ROPE, decoder_rope=DECODER_ROPE) -> dict:
    dd = {"hidden_size": 1024, "intermediate_size": 8192, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 2, "head_dim": 128, "max_position_embeddings": 33, "rope_theta": 500000,
          "rms_norm_eps": 1e-5}
    c = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 2048, "rope_theta": 500000,
         "rms_norm_eps": 1e-5, "vocab_size": 2051, "text_vocab_size": 128256, "num_codebooks": 32,
         "depth_decoder_config": dd}
    if rope_key:
        c[rope_key], dd[rope_key] = backbone_rope, decoder_rope
    return c


@pytest.mark.parametrize("rope_key", ["rope_scaling", "rope_parameters"])
def test_config_reads_rope_scaling_from_config_json(rope_key):
    cfg = CsmConfig.from_hf_config(_csm1b_like(rope_key))
    assert cfg.backbone.rope_scaling == (32.0, 0.125, 0.5, 1024.0)
    assert cfg.decoder.rope_scaling == (32.0, 0.001953125, 0.0078125, 16.0)
    base = CsmConfig.csm_1b()
    strip = lambda c: (c.num_layers, c.dim, c.num_heads, c.num_kv_heads, c.head_dim, c.ffn_dim)  # noqa: E731
    assert strip(cfg.backbone) == strip(base.backbone) and strip(cfg.decoder) == strip(base.decoder)
    assert cfg.max_seq_len == 2048 and cfg.decoder.max_seq_len == 32


@pytest.mark.parametrize("variant", ["absent", "transformers default"])
def test_config_without_llama3_scaling_gets_sesames(variant):
    """Never transformers' unscaled default: CSM was trained with Llama-3 scaling."""
    if variant == "absent":
        c = _csm1b_like(None)
    else:  # what transformers 5.x writes for a config saved without scaling
        default = {"rope_type": "default", "rope_theta": 500000.0}
        c = _csm1b_like("rope_parameters", default, default)
    cfg = CsmConfig.from_hf_config(c)
    assert cfg.backbone.rope_scaling == TORCHTUNE and cfg.decoder.rope_scaling == TORCHTUNE
    np.testing.assert_allclose(np.asarray(llama.rope_frequencies(cfg.backbone)), _hf_inv_freq(BACKBONE_ROPE, 64),
                               rtol=1e-6)


def test_config_rejects_other_rope_types():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'linear'"):
        CsmConfig.from_hf_config(_csm1b_like("rope_scaling", {"rope_type": "linear", "factor": 2.0}, DECODER_ROPE))


def _our_params_from_hf(model, cfg):
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    layers = []
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        layers.append({
            "attn_norm": sd[p + "input_layernorm.weight"],
            "wqkv": np.concatenate([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], 0),
            "wo": sd[p + "self_attn.o_proj.weight"], "mlp_norm": sd[p + "post_attention_layernorm.weight"],
            "w13": np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], 0),
            "w2": sd[p + "mlp.down_proj.weight"]})
    return jax.tree.map(jnp.asarray, {"layers": layers, "norm": sd["norm.weight"]})


@pytest.mark.slow
def test_forward_in_chunks_matches_transformers_llama():
    """A 1700-position sequence fed through the cache in uneven chunks, as prefill + decode do, equals
    transformers' LlamaModel on the whole sequence (GQA 4:1, head dim 64, csm-1b's Llama-3 scaling)."""
    from transformers import LlamaConfig as HfLlamaConfig
    from transformers import LlamaModel

    hf_cfg = HfLlamaConfig(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
                           vocab_size=16, rope_parameters=dict(BACKBONE_ROPE, rope_theta=500000.0),
                           attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    model = LlamaModel(hf_cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    S = 1700
    x = np.random.default_rng(0).standard_normal((1, S, 256)).astype(np.float32)
    with torch.no_grad():
        ref = model(inputs_embeds=torch.from_numpy(x)).last_hidden_state[0].numpy()

    cfg = llama.LlamaConfig.from_hf(hf_cfg.to_dict())
    params = _our_params_from_hf(model, cfg)
    cache = llama.init_cache(cfg, 1, 2048, jnp.float32)
    fwd = jax.jit(llama.forward, static_argnums=0)
    outs, start = [], 0
    for n in (1500, 150, 49, 1):
        out, cache = fwd(cfg, params, jnp.asarray(x[:, start:start + n]), jnp.arange(start, start + n)[None], cache)
        outs.append(np.asarray(out[0]))
        start += n
    ours = np.concatenate(outs)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"{err:.2e}"
    assert np.asarray(cache["pos"][0]).tolist() == list(range(S)) + [-1] * (2048 - S)
