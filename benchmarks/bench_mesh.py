"""Engine throughput per device count: the slots split along "data" over a mesh of D devices (csm_jax.sharding).

  python benchmarks/bench_mesh.py                                  # forced CPU devices 1, 2, 4, 8, tiny widths
  python benchmarks/bench_mesh.py --size csm-1b --dtype bfloat16 --slots-per-device 32 --no-forced
                                                                   # the machine's own devices (e.g. 8 GPUs)

For each device count D: an engine of D x --slots-per-device slots, or of --slots at every count (random
weights; D = 1: no mesh, the engine as it runs on one device; D > 1: `Generator(..., mesh=make_mesh(devices=
first D))`), every slot speaking, sampled, with frame caps beyond the run; after the programs have compiled, --steps engine steps
are timed (each: --frames-per-call frames for every slot and their Mimi decode, one host copy). Reported:
frames/s in total and per device, ms per step, and real-time streams (total frames/s over 12.5).

Forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=D, each count in a process of its own)
are threads of one process sharing this machine's cores: they show that the split engine runs and what the
split costs on the same cores, not a speedup. --local measures the devices JAX finds (GPUs or TPUs when
present; skipped when they are CPUs, which the forced counts already cover). The last line is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, Optional

import tyro

from csm_jax.engine import FRAMES_PER_CALL
from csm_jax.testing.inputs import tokenizer_file

FRAME_RATE = 12.5  # Mimi frames per second of audio


@dataclasses.dataclass
class Args:
    size: Literal["tiny", "csm-1b"] = "tiny"
    """Random weights: csm.CsmConfig.tiny() or csm_1b()."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    counts: tuple[int, ...] = (1, 2, 4, 8)
    """Forced CPU device counts, each measured in a process of its own."""
    forced: bool = True
    """Measure the forced CPU device counts."""
    local: bool = True
    """Measure the devices JAX finds here (1, 2, 4, ... up to all), when they are not CPUs."""
    slots_per_device: int = 2
    """Slots per device (the engine has D x this many)..."""
    slots: int = 0
    """...or this many slots at every device count (a multiple of each count): the same work split D ways."""
    frames_per_call: int = FRAMES_PER_CALL
    steps: int = 3
    """Engine steps timed after the programs have compiled."""
    mimi: Optional[str] = None
    """A Mimi checkpoint (default: a random Mimi built with moshi, as the tests build it)."""
    tokenizer: Optional[str] = None
    """Llama-3 tokenizer.json (default: the one scripts/test.sh fetches)."""
    child: int = 0
    """Internal: measure on this many devices in this process and print one JSON line."""


def random_mimi(folder: Path) -> str:
    """A random Mimi (moshi's architecture, the tests' weights) saved in Kyutai's layout; returns its path."""
    from csm_jax.testing.random_mimi import MOSHI_FILE, build_moshi_mimi, save_moshi_layout

    path = folder / MOSHI_FILE
    save_moshi_layout(build_moshi_mimi(seed=0), path)
    return str(path)


def measure(args: Args, devices: list) -> dict:
    """Throughput of an engine over `devices` (a mesh along "data"; one device: no mesh)."""
    import jax
    import jax.numpy as jnp

    from csm_jax import csm
    from csm_jax.generate import Generator
    from csm_jax.mimi import load_mimi
    from csm_jax.request import Request
    from csm_jax.sharding import device_mesh

    D = len(devices)
    cfg = csm.CsmConfig.csm_1b() if args.size == "csm-1b" else csm.CsmConfig.tiny()
    with jax.default_device(devices[0]):
        params = csm.init_params(cfg, jax.random.key(0), jnp.dtype(args.dtype))
    _, mimi = load_mimi(args.mimi)
    mesh = device_mesh(devices=devices)
    gen = Generator.from_parts(cfg, params, mimi, tokenizer_file(args.tokenizer), args.frames_per_call, mesh=mesh)
    del params
    slots = args.slots or D * args.slots_per_device
    driver = gen.driver(slots, max_prefill=slots)
    made = [0]  # frames delivered
    for i in range(slots):
        driver.submit(Request(f"Stream number {i} says a sentence.", speaker=i % 2, seed=i, max_audio_ms=80 * 1900),
                      lambda ev: made.__setitem__(0, made[0] + len(ev.codes)))
    steps = driver.steps()  # the engine stepped in this thread, one step per next()
    t = time.perf_counter()
    for _ in range(2):  # admit and dispatch, then dispatch the second step and collect the first: compiled
        next(steps)
    compile_s = time.perf_counter() - t
    made[0] = 0
    t = time.perf_counter()
    for _ in range(args.steps):
        next(steps)
    elapsed = time.perf_counter() - t
    frames = made[0]
    steps.close()
    return {"devices": D, "platform": devices[0].platform, "slots": slots, "frames": frames,
            "ms_per_step": 1e3 * elapsed / args.steps, "frames_per_s": frames / elapsed,
            "frames_per_s_per_device": frames / elapsed / D, "realtime_streams": frames / elapsed / FRAME_RATE,
            "first_steps_s": compile_s}


def forced(args: Args, D: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={D}", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--child", str(D), "--size", args.size, "--dtype", args.dtype,
           "--slots-per-device", str(args.slots_per_device), "--slots", str(args.slots),
           "--frames-per-call", str(args.frames_per_call),
           "--steps", str(args.steps), "--mimi", args.mimi, "--tokenizer", tokenizer_file(args.tokenizer)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{D} forced devices failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]), forced=True)


def main(args: Args) -> None:
    if args.child:
        import jax

        print(json.dumps(measure(args, jax.devices()[:args.child])))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.mimi is None:
            args.mimi = random_mimi(Path(tmp))
        if args.forced:
            for D in args.counts:
                rows.append(forced(args, D))
                print(f"forced CPU devices {D}: {rows[-1]['frames_per_s']:.1f} frames/s", file=sys.stderr)
        if args.local:
            import jax

            local = jax.local_devices()
            if local[0].platform == "cpu":
                print("local devices are CPUs: covered by the forced counts", file=sys.stderr)
            else:
                counts = sorted({min(1 << i, len(local)) for i in range(len(local).bit_length() + 1)})
                for D in counts:
                    rows.append(dict(measure(args, local[:D]), forced=False))
    print(f"{'devices':>7} {'kind':>12} {'slots':>5} {'ms/step':>9} {'frames/s':>9} {'per device':>10} "
          f"{'RT streams':>10}")
    for r in rows:
        kind = "forced cpu" if r["forced"] else r["platform"]
        print(f"{r['devices']:>7} {kind:>12} {r['slots']:>5} {r['ms_per_step']:>9.0f} {r['frames_per_s']:>9.1f} "
              f"{r['frames_per_s_per_device']:>10.1f} {r['realtime_streams']:>10.1f}")
    print(json.dumps({"size": args.size, "dtype": args.dtype, "frames_per_call": args.frames_per_call,
                      "slots_per_device": args.slots_per_device, "slots": args.slots, "rows": rows}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
