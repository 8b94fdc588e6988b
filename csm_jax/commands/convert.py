"""Convert Sesame's torch-only `ckpt.pt` (a pickled state dict) into `model.safetensors` in the same layout.

  pip install torch        # only this script needs it
  python scripts/convert_ckpt.py path/to/ckpt.pt path/to/out_folder

The output folder gets model.safetensors (Sesame's original key names and the stored dtypes, fp32, bf16 or
fp16, unchanged) and, unless one is already there, the config.json that Sesame's hub mixin writes for
csm-1b. Load it with `csm_jax.checkpoints.load_csm(out_folder)`, which casts to the compute dtype. To speak
with it, the scripts also need the Llama-3 tokenizer.json (in the folder, or --tokenizer) and Mimi (--mimi,
by default kyutai/mimi from the hub).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import tyro


@dataclasses.dataclass
class Args:
    ckpt: tyro.conf.Positional[Path]
    """Sesame's ckpt.pt."""
    out: tyro.conf.Positional[Path]
    """Output folder (created if missing)."""


def main(args: Args) -> None:
    try:
        import torch
    except ImportError as e:
        raise ImportError("converting ckpt.pt needs PyTorch: pip install torch") from e
    from safetensors.torch import save_file

    from csm_jax.checkpoints import detect_csm_layout

    if not args.ckpt.is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.ckpt}")
    try:
        sd = torch.load(str(args.ckpt), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad pickle
        raise ValueError(f"{args.ckpt} is not a loadable PyTorch checkpoint ({e})") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{args.ckpt} does not hold a state dict of tensors")
    detect_csm_layout(sd.keys())  # refuse anything that is not a CSM checkpoint
    args.out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.out, suffix=".tmp.safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, args.out / "model.safetensors")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    config = args.out / "config.json"
    if not config.exists():
        config.write_text(json.dumps({"audio_num_codebooks": 32, "audio_vocab_size": 2051, "backbone_flavor": "llama-1B",
                                      "decoder_flavor": "llama-100M", "text_vocab_size": 128256}, indent=2))
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()})
    print(f"{args.ckpt} -> {args.out / 'model.safetensors'} ({len(sd)} tensors, {', '.join(dtypes)})")

