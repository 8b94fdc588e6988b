"""Tiny random CSM checkpoints in the real file layouts, built with transformers' CsmForConditionalGeneration.

The config is csm-1b's config.json with smaller widths and depths but the real head dims (64 / 128), GQA
ratios (4:1) and both Llama-3 rope_scaling dicts exactly as transformers' convert_csm.py writes them
(the widths and depths of `csm_jax.csm.CsmConfig.tiny()`). Needs torch and transformers (the test extra).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from csm_jax.testing import reference
from csm_jax.testing.inputs import tokenizer_file

BACKBONE_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.125, "high_freq_factor": 0.5,
                 "original_max_position_embeddings": 1024}
DECODER_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.001953125,
                "high_freq_factor": 0.0078125, "original_max_position_embeddings": 16}


def tiny_hf_config():
    """transformers' CsmConfig of the tiny CSM."""
    CsmConfig = reference("transformers").CsmConfig
    depth = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=128, backbone_hidden_size=512, max_position_embeddings=33,
                 vocab_size=2051, num_codebooks=32, rope_theta=500000, rope_scaling=DECODER_ROPE, rms_norm_eps=1e-5)
    return CsmConfig(hidden_size=512, intermediate_size=256, num_hidden_layers=2, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5,
                     rope_theta=500000, rope_scaling=BACKBONE_ROPE, vocab_size=2051, text_vocab_size=128256,
                     num_codebooks=32, depth_decoder_config=depth, tie_codebooks_embeddings=True)


def build_hf_csm(seed: int = 0):
    """transformers' CsmForConditionalGeneration of the tiny config, random weights from `seed` (eval mode)."""
    torch = reference("torch")
    torch.manual_seed(seed)
    model = reference("transformers").CsmForConditionalGeneration(tiny_hf_config())
    with torch.no_grad():  # norms away from 1, so a missed scale shows
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def save_hf_layout(model, folder: Path, with_tokenizer: bool = True, mimi_tensors: dict | None = None) -> Path:
    """save_pretrained, optionally with the codec_model.* part replaced by given Mimi tensors (transformers'
    file layout): transformers' random Mimi init has all-zero codebooks, which would make decoded audio
    independent of the codes."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if mimi_tensors is not None:
        from safetensors.numpy import load_file, save_file

        (path,) = folder.glob("*.safetensors")
        tensors = load_file(str(path))
        codec = {k for k in tensors if k.startswith("codec_model.")}
        new = {f"codec_model.{k}": np.asarray(v) for k, v in mimi_tensors.items()}
        if set(new) != codec:
            raise ValueError(f"Mimi tensors do not match the codec keys: {sorted(set(new) ^ codec)[:5]}")
        tensors.update(new)
        save_file(tensors, str(path), metadata={"format": "pt"})
    if with_tokenizer:
        shutil.copy(tokenizer_file(), folder / "tokenizer.json")
    return folder


def hf_to_sesame_tensors(sd: dict, cfg) -> dict:
    """transformers' state dict -> Sesame's original names: the inverse of transformers' convert_csm.py."""
    def unpermute(w, n, hd):  # half-split rows -> interleaved rows
        d = w.shape[1]
        return w.reshape(n, 2, hd // 2, d).transpose(0, 2, 1, 3).reshape(n * hd, d)

    dcfg = cfg.depth_decoder_config
    out = {}
    for k, v in sd.items():
        v = np.ascontiguousarray(v.detach().float().numpy())
        if k.startswith("codec_model.") or k == "depth_decoder.model.embed_tokens.weight":
            continue
        if k.startswith("backbone_model.layers."):
            k2, n, kv, hd = "backbone.layers." + k[len("backbone_model.layers."):], cfg.num_attention_heads, \
                cfg.num_key_value_heads, cfg.head_dim
        elif k.startswith("depth_decoder.model.layers."):
            k2, n, kv, hd = "decoder.layers." + k[len("depth_decoder.model.layers."):], dcfg.num_attention_heads, \
                dcfg.num_key_value_heads, dcfg.head_dim
        else:
            k2 = {"embed_text_tokens.weight": "text_embeddings.weight",
                  "backbone_model.embed_tokens.embed_audio_tokens.weight": "audio_embeddings.weight",
                  "lm_head.weight": "codebook0_head.weight", "depth_decoder.codebooks_head.weight": "audio_head",
                  "depth_decoder.model.inputs_embeds_projector.weight": "projection.weight",
                  "backbone_model.norm.weight": "backbone.norm.scale",
                  "depth_decoder.model.norm.weight": "decoder.norm.scale"}[k]
            out[k2] = v
            continue
        for a, b in (("self_attn.o_proj", "attn.output_proj"), ("self_attn.", "attn."), ("mlp.gate_proj", "mlp.w1"),
                     ("mlp.down_proj", "mlp.w2"), ("mlp.up_proj", "mlp.w3"), ("input_layernorm.weight", "sa_norm.scale"),
                     ("post_attention_layernorm.weight", "mlp_norm.scale")):
            k2 = k2.replace(a, b)
        if k2.endswith("attn.q_proj.weight"):
            v = unpermute(v, n, hd)
        elif k2.endswith("attn.k_proj.weight"):
            v = unpermute(v, kv, hd)
        out[k2] = v
    return out


def save_sesame_layout(model, folder: Path) -> Path:
    """Sesame's layout; the tiny dims are described by a transformers-style config.json beside it."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(hf_to_sesame_tensors(model.state_dict(), model.config), str(folder / "model.safetensors"))
    cfg = model.config.to_dict()
    cfg.pop("codec_config", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder
