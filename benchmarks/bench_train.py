"""CSM training-step speed at full csm-1b size (random weights, synthetic rows, no download).

  python benchmarks/bench_train.py                                  # batch 1, 2048 rows, amortized and not
  python benchmarks/bench_train.py --batches 1 4 --rows 512 --lora-rank 16
  python benchmarks/bench_train.py --size tiny --batches 1 --rows 128 --steps 2    # a quick check that it runs
  python benchmarks/bench_train.py --batches 8 --devices 1 2 4 8 --fsdp             # per device count

Each sequence is 32 text rows then audio frames up to `--rows` (the last one the end-of-audio row), as the
fine-tuning data builds them. One step = loss, gradients and the AdamW update of csm_jax.train (jitted,
compiled and warmed up first, timed with block_until_ready; the median of `--steps`). Per (batch, depth
ratio): step time, audio frames/s (labelled frames trained per second), tokens/s (backbone rows per second),
peak memory (CPU: the process's peak resident set so far; GPU/TPU: the device's peak bytes in use), the step's
FLOPs from XLA's cost analysis and the model-FLOPs utilization against this machine's measured matmul
throughput (benchmarks/roofline.py, same run, same dtype). Prints a table and one JSON line.
With `--devices`, each configuration also runs on the first N devices (data parallel, a batch split N ways;
`--fsdp` splits the parameters and optimizer state too); on a CPU force devices with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (they share the CPU's cores: a check, not a speed-up).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import statistics
import sys
import time

import tyro



@dataclasses.dataclass
class Args:
    size: str = "csm-1b"
    """csm-1b (random weights at full size) or tiny (test widths)."""
    batches: tuple[int, ...] = (1,)
    """Batch sizes to sweep."""
    rows: int = 2048
    """Rows per sequence (32 text rows, the rest audio frames)."""
    depth_ratios: tuple[float, ...] = (1 / 16, 1.0)
    """Compute amortization ratios: the part of the frames the depth decoder trains on."""
    lora_rank: int = 0
    """0: full fine-tuning; else LoRA of this rank on every projection."""
    dtype: str = "auto"
    """Compute dtype: auto (fp32 on CPU, bf16 elsewhere), float32 or bfloat16."""
    remat: bool = False
    """Recompute layer activations in the backward pass."""
    steps: int = 3
    """Timed steps per configuration (after one compile-and-warm-up step)."""
    devices: tuple[int, ...] = (1,)
    """Device counts to sweep (data parallel over the first N devices; the batch must be a multiple of N)."""
    fsdp: bool = False
    """With several devices: split parameters and optimizer state along them too."""


def peak_memory_gb() -> float:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def main(args: Args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import roofline
    from csm_jax.csm import CsmConfig, init_params
    from csm_jax.train import data as D
    from csm_jax.train.placement import Placement, train_step, training_mesh
    from csm_jax.train.step import TrainConfig, split_params

    cfg = {"csm-1b": CsmConfig.csm_1b, "tiny": CsmConfig.tiny}[args.size]()
    if args.rows < 40 or args.rows > cfg.max_seq_len:
        raise SystemExit(f"--rows must lie in [40, {cfg.max_seq_len}]")
    rng = np.random.default_rng(0)
    text, frames = 32, args.rows - 32 - 1
    tokens = np.zeros((args.rows, 33), np.int32)
    mask = np.zeros((args.rows, 33), bool)
    tokens[:text, 32] = rng.integers(0, 128_000, text)
    mask[:text, 32] = True
    tokens[text:text + frames, :32] = rng.integers(0, 2048, (frames, 32))
    mask[text:, :32] = True
    labels = np.where(mask[:, :32].any(-1, keepdims=True), tokens[:, :32], D.IGNORE).astype(np.int32)
    eos = np.zeros(args.rows, bool)
    eos[-1] = True
    row = D.Rows(tokens, mask, labels, eos)

    compute = TrainConfig(compute_dtype=args.dtype).dtype()
    peak_gflops = roofline.matmul_gflops(dtype=compute)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), compute {jnp.dtype(compute).name}, "
          f"matmul peak measured {peak_gflops:.0f} GFLOP/s", file=sys.stderr)
    if max(args.devices) > jax.device_count() or min(args.devices) < 1:
        raise SystemExit(f"--devices must lie in [1, {jax.device_count()}] (the visible devices)")
    results = []
    for B, ratio, n in ((B, r, n) for B in args.batches for r in args.depth_ratios for n in args.devices):
        if B % n:
            print(f"skipped: batch {B} on {n} devices (not a multiple)", file=sys.stderr)
            continue
        tc = TrainConfig(batch_size=B, depth_ratio=ratio, lora_rank=args.lora_rank, compute_dtype=args.dtype,
                         remat=args.remat)
        mesh = training_mesh(n)
        pl = Placement(cfg, tc, mesh, args.fsdp)
        trainable, opt_state, frozen = pl.state(*split_params(cfg, init_params(cfg, jax.random.key(0)), tc))
        batch = D.collate([row] * B, B, ratio, np.random.default_rng(1), 1)
        batch = jax.tree.map(jnp.asarray, batch) if mesh is None else pl.batch(batch)
        t0 = time.perf_counter()
        compiled = train_step.lower(pl, trainable, opt_state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        trainable, opt_state, m = compiled(trainable, opt_state, frozen, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            trainable, opt_state, m = compiled(trainable, opt_state, frozen, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        n_frames = int((np.asarray(batch["labels"])[..., 0] != D.IGNORE).sum())
        r = {"batch": B, "devices": n, "fsdp": args.fsdp and n > 1, "rows": args.rows, "depth_ratio": ratio,
             "depth_frames": int(np.asarray(batch["depth_valid"]).sum()),
             "lora_rank": args.lora_rank, "step_s": dt, "frames_per_s": n_frames / dt,
             "tokens_per_s": B * args.rows / dt, "peak_memory_gb": peak_memory_gb(), "step_gflop": flops / 1e9,
             "mfu": flops / dt / (peak_gflops * 1e9), "compile_s": compile_s, "loss": float(m["loss"])}
        results.append(r)
        del trainable, opt_state, frozen
    head = (f"{'batch':>5} {'dev':>3} {'ratio':>6} {'depth':>5} {'step s':>8} {'frames/s':>9} {'tokens/s':>9} "
            f"{'peak GB':>8} {'GFLOP':>8} {'MFU':>6}")
    print(head)
    for r in results:
        print(f"{r['batch']:>5} {r['devices']:>3} {r['depth_ratio']:>6.3f} {r['depth_frames']:>5} {r['step_s']:>8.3f} "
              f"{r['frames_per_s']:>9.1f} {r['tokens_per_s']:>9.1f} {r['peak_memory_gb']:>8.2f} "
              f"{r['step_gflop']:>8.1f} {r['mfu']:>6.1%}")
    print(json.dumps({"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "size": args.size,
                      "dtype": jnp.dtype(compute).name, "matmul_peak_gflops": peak_gflops, "results": results}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
