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


def _check_safetensors_header(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or n > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length). If it is a PyTorch "
                                  "pickle (.pt/.bin), convert it first with scripts/convert_ckpt.py")
        first = fh.read(1)
        if first != b"{":
            raise CheckpointError(f"{path}: not a safetensors file (header is not JSON)")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of one safetensors file as numpy arrays; bf16/fp16 are widened to float32."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    _check_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, TypeError) as e:
        if "bfloat16" not in str(e) and "bf16" not in str(e).lower():
            raise CheckpointError(f"{path}: cannot read as safetensors ({e})") from e
    # numpy has no bfloat16: read through ml_dtypes (a jax dependency) and widen.
    import ml_dtypes
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    with safe_open(str(path), framework="flax") as fh:
        for k in fh.keys():
            out[k] = np.asarray(fh.get_tensor(k)).astype(np.float32)
    del ml_dtypes
    return out


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
