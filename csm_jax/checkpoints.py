"""Checkpoint files: finding them (hub id or local path), reading safetensors, strict key accounting.

The format mappings (which key goes where, with which transform) live next to this core: the CSM layouts
below, the Mimi layouts in `csm_jax/mimi/checkpoint.py`. Every loader is strict: a missing, unexpected,
duplicate or mis-shaped tensor is an error that names the file, the key and what was expected.
"""

from __future__ import annotations

import fnmatch
import json
import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message says which file, key and why."""


def resolve_files(id_or_path: str | os.PathLike, patterns: Sequence[str]) -> list[Path]:
    """Returns the checkpoint files matching `patterns` (glob, e.g. "*.safetensors", "config.json").

    `id_or_path` is a local file, a local folder, or a Hugging Face hub repo id ("sesame/csm-1b"), which is
    downloaded through huggingface_hub into its usual cache (set HF_HUB_OFFLINE=1 to use only the cache).
    A local file is returned as is when it matches any pattern. Missing optional files are simply absent
    from the result; callers decide what is required.
    """
    path = Path(os.path.expanduser(str(id_or_path)))
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted({p for pat in patterns for p in path.glob(pat) if p.is_file()})
        return found
    text = str(id_or_path)
    parts = text.split("/")
    is_repo_id = len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
    if not is_repo_id:
        raise FileNotFoundError(f"checkpoint not found: '{text}' is neither an existing file or folder "
                                "nor a hub repo id of the form 'owner/name'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ImportError("huggingface_hub is needed to download hub checkpoints: pip install huggingface_hub") from e
    try:
        folder = Path(snapshot_download(repo_id=text, allow_patterns=list(patterns)))
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"cannot download '{text}' from the Hugging Face hub and it is not in the local cache "
                                f"({e.__class__.__name__}); check the network, or pass a local path") from e
    except HfHubHTTPError as e:
        raise FileNotFoundError(f"cannot download '{text}' from the Hugging Face hub: {e}. Gated repos need "
                                "`huggingface-cli login` after accepting the license on the model page") from e
    return sorted({p for pat in patterns for p in folder.glob(pat) if p.is_file()})


def read_config(files: Iterable[Path]) -> dict | None:
    """The parsed config.json among `files`, or None."""
    for f in files:
        if f.name == "config.json":
            try:
                return json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{f}: config.json is not valid JSON ({e})") from e
    return None


INCOMPLETE = ("the file is damaged or incomplete (an interrupted download or copy?): download or copy it again "
              "(a hub checkpoint: delete it from the Hugging Face cache, ~/.cache/huggingface/hub, first)")


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        first = fh.read(1)
        if first == b"{" and size - 8 < n <= 100 * 2**20:
            raise CheckpointError(f"{path}: incomplete ({size} bytes end inside its {n}-byte header): {INCOMPLETE}")
        if n <= 1 or n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length). If it is a PyTorch "
                                  "pickle (.pt/.bin), convert it first with scripts/convert_ckpt.py")
        if first != b"{":
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays in the dtype stored (bf16 as ml_dtypes.bfloat16).

    Nothing is cast here: the loaders cast each model's parameters to its one compute dtype
    (`compute_dtype`), after deriving any tensor computed from several (Mimi's codebooks) in float32.
    """
    import ml_dtypes  # noqa: F401 - a jax dependency; registers bfloat16 with numpy so bf16 files load
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    _check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read as safetensors ({e}): {INCOMPLETE}") from e


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype(dtype=None, model: str = "csm"):
    """The one dtype a model's parameters are cast to, whatever dtype its files store (fp32, bf16, fp16).

    `dtype` None or "auto" means the model's default: for CSM float32 on CPU (XLA:CPU bf16 matmuls are very
    slow) and bfloat16 on GPU/TPU; for Mimi always float32. Otherwise a name or dtype among COMPUTE_DTYPES.
    """
    import jax
    import jax.numpy as jnp

    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        if model == "mimi" or jax.default_backend() == "cpu":
            return jnp.dtype(jnp.float32)
        return jnp.dtype(jnp.bfloat16)
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(COMPUTE_DTYPES)}") from e
    if dt.name not in COMPUTE_DTYPES:
        raise ValueError(f"{model} cannot compute in {dt.name}: use one of auto, {', '.join(COMPUTE_DTYPES)} "
                         "(checkpoints stored in float16 load into either)")
    return dt


def read_safetensors_files(files: Sequence[Path]) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """Merges shards; returns (tensors, key -> file). A key present in two shards is an error."""
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for f in files:
        for k, v in read_safetensors(f).items():
            if k in tensors:
                raise CheckpointError(f"duplicate tensor '{k}': present in both {origin[k]} and {f}")
            tensors[k] = v
            origin[k] = f
    return tensors, origin


class StrictTensors:
    """Hands out tensors by key with shape checks and records what was used, so leftovers are errors."""

    def __init__(self, tensors: dict[str, np.ndarray], source: str):
        self.tensors = tensors
        self.source = source
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def take(self, key: str, shape: Sequence[int] | None = None) -> np.ndarray:
        if key in self.used:
            raise CheckpointError(f"{self.source}: tensor '{key}' consumed twice (mapping bug)")
        if key not in self.tensors:
            raise CheckpointError(f"{self.source}: missing tensor '{key}'"
                                  + (f" (expected shape {tuple(shape)})" if shape is not None else ""))
        arr = self.tensors[key]
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: tensor '{key}' has shape {tuple(arr.shape)}, "
                                  f"expected {tuple(shape)}; the file does not match the model config")
        self.used.add(key)
        return arr

    def skip(self, *patterns: str) -> None:
        """Marks keys matching any glob pattern as deliberately unused (e.g. flags the model does not need)."""
        for k in self.tensors:
            if any(fnmatch.fnmatchcase(k, p) for p in patterns):
                self.used.add(k)

    def finish(self) -> None:
        left = sorted(set(self.tensors) - self.used)
        if left:
            shown = ", ".join(f"'{k}'" for k in left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            raise CheckpointError(f"{self.source}: {len(left)} unexpected tensor(s) not used by the model: {shown}. "
                                  "The file is of another model or layout, or the config does not match it")


# ------------------------------------------------------------------------------------------------------ CSM
# Two layouts, detected from key names:
#   sesame  Sesame's original (torchtune names: backbone.layers.N.attn.q_proj.weight, ...), q/k rows in
#           interleaved-RoPE order; Mimi is not inside (it comes from kyutai/mimi).
#   hf      transformers' CsmForConditionalGeneration (backbone_model.layers.N.self_attn.q_proj.weight, ...),
#           q/k rows in half-split order (our order), with Mimi under codec_model.*.
# Linear weights keep PyTorch's (out, in) layout (fastest for XLA:CPU's skinny matmuls); the audio heads,
# stored (31, in, out), are transposed to match. q|k|v and gate|up are fused for one matmul each.


def permute_for_rope(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Interleaved-pair rows (Sesame/torchtune) -> half-split rows (transformers), per transformers' convert_csm."""
    d_in = w.shape[1]
    return w.reshape(n_heads, head_dim // 2, 2, d_in).transpose(0, 2, 1, 3).reshape(n_heads * head_dim, d_in)


def _csm_names(layout: str, part: str) -> dict:
    if layout == "sesame":
        return {"layer": f"{part}.layers.{{}}", "q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj",
                "o": "attn.output_proj", "gate": "mlp.w1", "up": "mlp.w3", "down": "mlp.w2",
                "attn_norm": "sa_norm.scale", "mlp_norm": "mlp_norm.scale", "norm": f"{part}.norm.scale"}
    prefix = "backbone_model" if part == "backbone" else "depth_decoder.model"
    return {"layer": f"{prefix}.layers.{{}}", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
            "v": "self_attn.v_proj", "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj", "attn_norm": "input_layernorm.weight",
            "mlp_norm": "post_attention_layernorm.weight", "norm": f"{prefix}.norm.weight"}


def _llama_params(st: StrictTensors, cfg, layout: str, part: str, dtype) -> dict:
    import jax.numpy as jnp

    n = _csm_names(layout, part)
    D, N, K, H, M = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    layers = []
    for i in range(cfg.num_layers):
        pre = n["layer"].format(i)
        q = st.take(f"{pre}.{n['q']}.weight", (N * H, D))
        k = st.take(f"{pre}.{n['k']}.weight", (K * H, D))
        if layout == "sesame":
            q, k = permute_for_rope(q, N, H), permute_for_rope(k, K, H)
        v = st.take(f"{pre}.{n['v']}.weight", (K * H, D))
        gate = st.take(f"{pre}.{n['gate']}.weight", (M, D))
        up = st.take(f"{pre}.{n['up']}.weight", (M, D))
        layers.append({
            "attn_norm": jnp.asarray(st.take(f"{pre}.{n['attn_norm']}", (D,)), dtype),
            "wqkv": jnp.asarray(np.concatenate([q, k, v], 0), dtype),
            "wo": jnp.asarray(st.take(f"{pre}.{n['o']}.weight", (D, N * H)), dtype),
            "mlp_norm": jnp.asarray(st.take(f"{pre}.{n['mlp_norm']}", (D,)), dtype),
            "w13": jnp.asarray(np.concatenate([gate, up], 0), dtype),
            "w2": jnp.asarray(st.take(f"{pre}.{n['down']}.weight", (D, M)), dtype),
        })
    return {"layers": layers, "norm": jnp.asarray(st.take(n["norm"], (D,)), dtype)}


def detect_csm_layout(keys) -> str:
    keys = set(keys)
    if "backbone.layers.0.attn.q_proj.weight" in keys:
        return "sesame"
    if "backbone_model.layers.0.self_attn.q_proj.weight" in keys:
        return "hf"
    if "encoder.model.0.conv.conv.weight" in keys or "encoder.layers.0.conv.weight" in keys:
        raise CheckpointError("this is a Mimi checkpoint, not CSM; load it with csm_jax.mimi.load_mimi")
    sample = ", ".join(sorted(keys)[:3])
    raise CheckpointError("not a CSM checkpoint: neither 'backbone.layers.0.attn.q_proj.weight' (Sesame's layout) "
                          f"nor 'backbone_model.layers.0.self_attn.q_proj.weight' (transformers') is present; "
                          f"keys start: {sample}")


def csm_params_from_tensors(tensors: dict[str, np.ndarray], cfg, source: str, dtype=None):
    """Our CSM parameters from checkpoint tensors of either layout, in any float dtype (strict), cast to
    `compute_dtype(dtype)`. -> (params, the codec_model.* tensors as stored or None)."""
    import jax.numpy as jnp

    dtype = compute_dtype(dtype, "csm")
    layout = detect_csm_layout(tensors.keys())
    st = StrictTensors(tensors, source)
    D, Dd, V, C = cfg.backbone.dim, cfg.decoder.dim, cfg.audio_vocab_size, cfg.num_codebooks
    if layout == "sesame":
        text, audio = st.take("text_embeddings.weight", (cfg.text_vocab_size, D)), st.take(
            "audio_embeddings.weight", (C * V, D))
        proj = st.take("projection.weight", (Dd, D))
        c0 = st.take("codebook0_head.weight", (V, D))
        head = st.take("audio_head", (C - 1, Dd, V))
        codec = None
    else:
        text = st.take("embed_text_tokens.weight", (cfg.text_vocab_size, D))
        # transformers ties the depth decoder's embedding to the backbone's audio table: either may be stored.
        a_key, d_key = "backbone_model.embed_tokens.embed_audio_tokens.weight", "depth_decoder.model.embed_tokens.weight"
        if a_key in st and d_key in st:
            audio = st.take(a_key, (C * V, D))
            if not np.array_equal(audio, st.take(d_key, (C * V, D))):
                raise CheckpointError(f"{source}: '{a_key}' and '{d_key}' differ, but CSM ties them")
        else:
            audio = st.take(a_key if a_key in st else d_key, (C * V, D))
        proj = st.take("depth_decoder.model.inputs_embeds_projector.weight", (Dd, D))
        c0 = st.take("lm_head.weight", (V, D))
        head = st.take("depth_decoder.codebooks_head.weight", (C - 1, Dd, V))
        codec = {k[len("codec_model."):]: v for k, v in tensors.items() if k.startswith("codec_model.")} or None
        st.skip("codec_model.*")
    params = {
        "text_embed": jnp.asarray(text, dtype), "audio_embed": jnp.asarray(audio, dtype),
        "c0_head": jnp.asarray(c0, dtype), "projection": jnp.asarray(proj, dtype),
        "audio_head": [jnp.asarray(np.ascontiguousarray(h.T), dtype) for h in head],  # 31 x (V, Dd)
        "backbone": _llama_params(st, cfg.backbone, layout, "backbone", dtype),
        "decoder": _llama_params(st, cfg.decoder, layout, "decoder", dtype),
    }
    st.finish()
    return params, codec


class CsmCheckpoint:
    """A loaded CSM checkpoint: config, parameters, the Mimi tensors stored with it (or None), the tokenizer."""

    def __init__(self, config, params, codec_tensors, tokenizer_file, source):
        self.config, self.params, self.codec_tensors = config, params, codec_tensors
        self.tokenizer_file, self.source = tokenizer_file, source


def default_dtype():
    """CSM's default compute dtype: fp32 on CPU (XLA:CPU bf16 matmuls are very slow), bf16 on GPU/TPU."""
    return compute_dtype(None, "csm")


def load_csm(id_or_path: str | os.PathLike = "sesame/csm-1b", dtype=None) -> CsmCheckpoint:
    """Loads CSM from a hub repo id or a local folder/.safetensors file, in Sesame's or transformers' layout.

    The config (including the RoPE scaling) comes from the checkpoint's config.json; a bare file without one
    is read as csm-1b. A torch-only ckpt.pt must be converted first with scripts/convert_ckpt.py. The weights
    may be stored in fp32, bf16 or fp16; `dtype` is the compute dtype they are cast to (`compute_dtype`:
    None or "auto" = float32 on CPU, bfloat16 on GPU/TPU). The codec_model.* tensors are kept as stored.
    """
    from csm_jax.csm import CsmConfig

    files = resolve_files(id_or_path, ["*.safetensors", "config.json", "tokenizer.json"])
    weights = [f for f in files if f.name not in ("config.json", "tokenizer.json")]
    if not weights:
        hint = " (found ckpt.pt: convert it with scripts/convert_ckpt.py)" if Path(str(id_or_path), "ckpt.pt").exists() else ""
        raise FileNotFoundError(f"no .safetensors weights found in {id_or_path}{hint}; a CSM checkpoint folder "
                                "holds model.safetensors (or its shards), config.json and tokenizer.json")
    config = read_config(files)
    try:
        cfg = CsmConfig.from_hf_config(config) if config else CsmConfig.csm_1b()
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{id_or_path}: config.json is not a CSM config ({e})") from e
    tensors, _ = read_safetensors_files(weights)
    source = str(weights[0]) if len(weights) == 1 else f"{id_or_path} ({len(weights)} files)"
    params, codec = csm_params_from_tensors(tensors, cfg, source, compute_dtype(dtype, "csm"))
    tok = next((str(f) for f in files if f.name == "tokenizer.json"), None)
    return CsmCheckpoint(cfg, params, codec, tok, source)
