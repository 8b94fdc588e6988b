"""Fine-tune CSM on your recordings: full fine-tuning or LoRA, checkpoints, resume, export.

  python scripts/finetune.py --data my_voice/ --out runs/my_voice --steps 2000
  python scripts/finetune.py --data dialogues.jsonl --out runs/lora --lora-rank 16 --learning-rate 2e-4
  python scripts/finetune.py --data my_voice/ --out runs/my_voice --steps 2000 --resume

--data is a folder of NAME.wav + NAME.txt (+ optional NAME.json {"speaker": 1}) or a JSONL manifest, one
{"audio", "text", "speaker", "context": [earlier turns]} per line. The audio is Mimi-encoded once into
OUT/cache (reused by later runs); bad examples (unreadable, empty, longer than the model's 2048 positions)
are listed and skipped. A held-out part (--eval-fraction) gives the eval loss. Progress shows loss, frames/s
and the ETA; OUT/metrics.jsonl has one JSON line per step. Checkpoints (orbax) go to OUT/checkpoints every
--checkpoint-every steps, keeping the last --keep; --resume continues exactly where the last one left off.
At the end the model (LoRA merged) is exported to OUT/export in transformers' layout with config, tokenizer
and Mimi: load it with `Generator("OUT/export")`, scripts/synthesize.py --checkpoint OUT/export, or
transformers' CsmForConditionalGeneration.from_pretrained.

Several devices: by default training is data-parallel over every visible device (--batch-size must be a
multiple of their count); --fsdp also splits parameters and optimizer state across them, --mesh-model M adds
tensor parallelism. Checkpoints restore onto any device count.

Several hosts: start the same command on every host (one process per host, or per GPU under Slurm/mpirun)
with JAX_COORDINATOR_ADDRESS=host:port of process 0, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=0..N-1 (or a
launcher JAX detects; see csm_jax/distributed.py). Training then runs on the mesh of all processes' devices,
--batch-size being the global batch; put --out (and --cache) on a filesystem every host sees: process 0
encodes the audio and writes metrics and the export, all processes write the checkpoints together (a host
that does not see the cache encodes its own copy).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Literal, Optional

from csm_jax.train.lora import TARGETS


@dataclasses.dataclass
class Args:
    data: Path
    """Training data: a folder of NAME.wav + NAME.txt (+ NAME.json) or a .jsonl manifest."""
    out: Path
    """Output folder: cache/, checkpoints/, metrics.jsonl, export/."""
    checkpoint: str = "sesame/csm-1b"
    """Base model: hub repo id or local folder in transformers' layout (its Mimi and config are exported)."""
    mimi: Optional[str] = None
    """Mimi checkpoint for encoding when the base has none inside (Sesame's layout; export then needs a
    transformers-layout base)."""
    tokenizer: Optional[Path] = None
    """Llama-3 tokenizer.json when the base has none."""
    cache: Optional[Path] = None
    """Mimi-code cache folder (default OUT/cache); shared between runs on the same data."""
    steps: int = 1000
    """Optimizer updates."""
    batch_size: int = 4
    """Examples per micro-batch (padded to a common, bucketed length)."""
    accumulate: int = 1
    """Micro-batches per update."""
    learning_rate: float = 2e-5
    """Peak learning rate (LoRA usually wants ~1e-4 to 2e-4)."""
    warmup_steps: int = 50
    """Linear warmup, then cosine decay to learning_rate * min_lr_ratio at --steps."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    """AdamW decoupled weight decay (matrices only)."""
    clip_norm: float = 1.0
    """Global gradient-norm clipping."""
    depth_ratio: float = 1 / 16
    """Compute amortization: the part of the audio frames the depth decoder trains on (1 = all)."""
    context_loss: bool = True
    """Train on the audio of context turns too (transformers' processor does); --no-context-loss: only the utterance."""
    lora_rank: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    lora_alpha: float = 16.0
    """LoRA scale is alpha / rank."""
    lora_targets: tuple[str, ...] = TARGETS
    """Projections that get adapters, in both transformers."""
    freeze_backbone: bool = False
    """Train only the depth decoder side (decoder, projection, audio heads); the backbone, embeddings and
    codebook-0 head stay as they are."""
    compute_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: float32 on CPU, bfloat16 on GPU/TPU. Weights and optimizer state stay float32."""
    remat: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    eval_fraction: float = 0.05
    """Part of the examples held out for the eval loss (at least one; 0 = none)."""
    eval_every: int = 100
    """Eval loss every this many steps (and at the end)."""
    checkpoint_every: int = 100
    """Checkpoint every this many steps (and at the end)."""
    keep: int = 3
    """Checkpoints kept."""
    resume: bool = False
    """Continue from the last checkpoint in OUT/checkpoints with the same settings."""
    seed: int = 0
    """Seed of the data order, the held-out split, the amortization draws and LoRA's init."""
    encode_batch: int = 8
    """Audio files Mimi-encodes at once."""
    export: bool = True
    """Export to OUT/export at the end (--no-export: checkpoints only)."""
    export_dtype: Literal["float32", "bfloat16"] = "float32"
    stop_after: Optional[int] = None
    """Stop after this many steps of this run (checkpointed; continue later with --resume)."""
    mesh_data: Optional[int] = None
    """Data-parallel devices, each taking batch-size / N examples (default: every visible device left after
    --mesh-model; --mesh-data 1 trains on one device)."""
    mesh_model: int = 1
    """Tensor-parallel devices (the backbone's attention output and MLP down projections split)."""
    fsdp: bool = False
    """Also split every weight matrix and its optimizer state along the data-parallel devices (less memory
    per device; the same result up to fp32 rounding)."""


def main(args: Args) -> None:
    from csm_jax import distributed

    # A multi-host run: join the other processes before anything touches a device.
    distributed.initialize(cross_process_collectives=True)
    from csm_jax.train.step import SettingError

    try:
        _finetune(args)
    except SettingError as e:  # the library names its settings `name`; here they are flags
        raise ValueError(as_flags(str(e))) from None


def as_flags(message: str) -> str:
    """A training library message with its settings (`batch_size`) named as this command's flags (--batch-size)."""
    import re

    renamed = {"out_dir": "out"}
    return re.sub(r"`(\w+)`", lambda m: "--" + renamed.get(m[1], m[1]).replace("_", "-"), message)


def _finetune(args: Args) -> None:
    import jax
    import jax.numpy as jnp

    from csm_jax import distributed
    from csm_jax.checkpoints import load_csm
    from csm_jax.mimi import load_mimi, mimi_params_from_tensors
    from csm_jax.text import Tokenizer
    from csm_jax.train import data as D
    from csm_jax.train.export import export_hf
    from csm_jax.train.placement import check_batch, host_values, training_mesh
    from csm_jax.train.step import TrainConfig, joined
    from csm_jax.train.trainer import RunOptions, fit

    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, accumulate=args.accumulate,
                     learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, min_lr_ratio=args.min_lr_ratio,
                     weight_decay=args.weight_decay, clip_norm=args.clip_norm, depth_ratio=args.depth_ratio,
                     context_loss=args.context_loss, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                     lora_targets=tuple(args.lora_targets), freeze_backbone=args.freeze_backbone,
                     compute_dtype=args.compute_dtype, remat=args.remat, seed=args.seed).check()
    if not 0 <= args.eval_fraction < 1:
        raise ValueError(f"--eval-fraction must lie in [0, 1), got {args.eval_fraction}")
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} is a file: give a folder for the run (it is created if missing)")
    check_batch(tc, training_mesh(args.mesh_data, args.mesh_model))  # before anything is loaded
    ckpt = load_csm(args.checkpoint, jnp.float32)
    if ckpt.codec_tensors is not None and args.mimi is None:
        _, mimi = mimi_params_from_tensors(ckpt.codec_tensors, f"{ckpt.source} (codec_model.*)")
    else:
        _, mimi = load_mimi(args.mimi or "kyutai/mimi")
    tok_file = args.tokenizer or ckpt.tokenizer_file
    if tok_file is None:
        raise FileNotFoundError(f"{args.checkpoint} has no tokenizer.json: pass --tokenizer (Llama-3's tokenizer.json)")
    tok = Tokenizer(tok_file)
    cache = args.cache or args.out / "cache"
    primary = jax.process_index() == 0

    def encode():
        D.build_cache(args.data, cache, mimi, tok, ckpt.config.max_seq_len, args.encode_batch,
                      log=lambda s: print(s, file=sys.stderr))
    if primary or jax.process_count() == 1:
        try:
            encode()
        except BaseException as e:
            distributed.report_failure(f"encoding the training data: {e}")
            raise
    distributed.barrier("finetune-cache")  # the other processes read what process 0 encoded
    if not (cache / "index.jsonl").exists():  # this host does not see process 0's cache: encode its own
        encode()
    names, rows = D.load_index(cache, tok, args.context_loss)
    train_idx, eval_idx = D.split_eval(len(rows), args.eval_fraction, args.seed)
    print(f"{len(train_idx)} training and {len(eval_idx)} held-out examples, "
          f"{sum(int((rows[i].labels[:, 0] != D.IGNORE).sum()) for i in train_idx)} training frames", file=sys.stderr)
    run = RunOptions(out_dir=args.out, checkpoint_every=args.checkpoint_every, keep=args.keep,
                     eval_every=args.eval_every, resume=args.resume, stop_after=args.stop_after,
                     base=str(args.checkpoint), mesh_data=args.mesh_data, mesh_model=args.mesh_model,
                     fsdp=args.fsdp)
    cfg = ckpt.config
    trainable, frozen, history = fit(cfg, ckpt.params, [rows[i] for i in train_idx], [rows[i] for i in eval_idx],
                                     tc, run, log=lambda s: print(s, file=sys.stderr))
    lines = (args.out / "metrics.jsonl").read_text().splitlines() if (args.out / "metrics.jsonl").exists() else []
    last = json.loads(lines[-1]) if lines else (history[-1] if history else {})
    del history
    if last and primary:
        print(json.dumps({k: last[k] for k in ("step", "loss", "eval_loss") if k in last}))
    done = last.get("step", 0) >= tc.steps
    if args.export and done:
        params, _ = joined(cfg, trainable, frozen, tc, merged=True)
        params = host_values(params)  # every process takes part in gathering; process 0 writes
        if primary:
            try:
                path = export_hf(args.out / "export", cfg, params, args.checkpoint, str(tok_file),
                                 dtype=args.export_dtype)
            except BaseException as e:
                distributed.report_failure(f"exporting: {e}")
                raise
            print(f"exported to {path}", file=sys.stderr)
        distributed.barrier("finetune-export")
    elif not done and primary:
        print(f"stopped at step {last.get('step', 0)} of {tc.steps}; continue with --resume", file=sys.stderr)

