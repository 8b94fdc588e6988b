"""Fine-tuned parameters -> a checkpoint folder in transformers' CsmForConditionalGeneration layout.

The inverse of `checkpoints.csm_params_from_tensors` for the "hf" layout: fused q|k|v and gate|up split
back, the 31 audio heads stacked as (31, in, out), the audio table written once under the depth decoder's
key (transformers ties it to the backbone's, and saves it that way). The folder also gets the base
checkpoint's config.json (and generation_config.json), its Mimi (`codec_model.*`) and tokenizer.json, so
our `Generator`, scripts/serve.py and transformers load it as they load the base. LoRA adapters are
merged first.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from csm_jax.checkpoints import CheckpointError, resolve_files


def _np(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32))


def hf_tensors(cfg, params: dict) -> dict[str, np.ndarray]:
    """Our CSM parameters -> {transformers name: fp32 array} (without codec_model.*)."""
    out = {"embed_text_tokens.weight": _np(params["text_embed"]),
           "depth_decoder.model.embed_tokens.weight": _np(params["audio_embed"]),
           "lm_head.weight": _np(params["c0_head"]),
           "depth_decoder.model.inputs_embeds_projector.weight": _np(params["projection"]),
           "depth_decoder.codebooks_head.weight": np.stack([_np(h).T for h in params["audio_head"]]),
           "backbone_model.norm.weight": _np(params["backbone"]["norm"]),
           "depth_decoder.model.norm.weight": _np(params["decoder"]["norm"])}
    for part, prefix, lcfg in (("backbone", "backbone_model", cfg.backbone),
                               ("decoder", "depth_decoder.model", cfg.decoder)):
        N, K, H, M = lcfg.num_heads, lcfg.num_kv_heads, lcfg.head_dim, lcfg.ffn_dim
        for i, p in enumerate(params[part]["layers"]):
            pre = f"{prefix}.layers.{i}"
            qkv, w13 = _np(p["wqkv"]), _np(p["w13"])
            out.update({f"{pre}.self_attn.q_proj.weight": qkv[:N * H],
                        f"{pre}.self_attn.k_proj.weight": qkv[N * H:(N + K) * H],
                        f"{pre}.self_attn.v_proj.weight": qkv[(N + K) * H:],
                        f"{pre}.self_attn.o_proj.weight": _np(p["wo"]),
                        f"{pre}.mlp.gate_proj.weight": w13[:M], f"{pre}.mlp.up_proj.weight": w13[M:],
                        f"{pre}.mlp.down_proj.weight": _np(p["w2"]),
                        f"{pre}.input_layernorm.weight": _np(p["attn_norm"]),
                        f"{pre}.post_attention_layernorm.weight": _np(p["mlp_norm"])})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def export_hf(out_dir: str | os.PathLike, cfg, params: dict, base: str | os.PathLike, tokenizer: str | None = None,
              lora: dict | None = None, lora_scale: float = 1.0, dtype: str = "float32") -> Path:
    """Writes `out_dir` with model.safetensors, config.json, generation_config.json (when the base has one)
    and tokenizer.json. `base` is the checkpoint training started from, in transformers' layout: its config
    and Mimi are copied. dtype "float32" or "bfloat16" for the CSM weights (Mimi keeps the base's)."""
    from safetensors.numpy import save_file

    from csm_jax.checkpoints import read_config, read_safetensors_files
    from csm_jax.train.lora import merge

    files = resolve_files(base, ["*.safetensors", "config.json", "generation_config.json", "tokenizer.json"])
    config = read_config(files)
    if not config or "depth_decoder_config" not in config:
        raise CheckpointError(f"{base}: export needs a base checkpoint in transformers' layout (its config.json "
                              "with depth_decoder_config and its codec_model.* Mimi), e.g. sesame/csm-1b's "
                              "model.safetensors; a Sesame-layout base has neither")
    weights = [f for f in files if f.suffix == ".safetensors"]
    codec = {k: v for k, v in read_safetensors_files(weights)[0].items() if k.startswith("codec_model.")}
    if not codec:
        raise CheckpointError(f"{base}: no codec_model.* tensors (Mimi) to include in the export")
    tok = tokenizer or next((str(f) for f in files if f.name == "tokenizer.json"), None)
    if tok is None:
        raise FileNotFoundError(f"{base} has no tokenizer.json: pass the Llama-3 tokenizer.json to export with")
    if lora is not None:
        params = merge(cfg, params, lora, lora_scale)
    tensors = hf_tensors(cfg, params)
    if dtype == "bfloat16":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    elif dtype != "float32":
        raise ValueError(f"export dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    tensors.update(codec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    config = dict(config, dtype=dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in files:
        if f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    if Path(tok).resolve() != (out / "tokenizer.json").resolve():
        shutil.copy(tok, out / "tokenizer.json")
    return out
