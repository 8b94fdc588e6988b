"""Serving start-up: how many programs an engine of N slots compiles, and how long they take.

  python benchmarks/bench_startup.py --slots 1024                    # csm-1b shapes, fp32 (e.g. on a CPU)
  python benchmarks/bench_startup.py --slots 1024 --dtype bfloat16   # as a server runs on a GPU

The engine's program table (csm_jax.programs) at --slots slots is built from the shapes of the parameters
and states alone: nothing of their size is allocated (csm-1b at 1,024 slots holds a 137 GB cache in fp32),
so the full size compiles on any machine. Every program is then compiled as the server's warm-up compiles
it (`Programs.compile`, --workers at once), twice: from a cold compile cache (an empty folder for JAX's
on-disk cache), then, after dropping what this process holds in memory, from that folder (a restart).
Printed per program: its compile seconds (lowering included) and XLA's memory analysis (temporaries, and
outputs beyond those written in place of the donated state); then the totals and the state's size. The
last line is JSON. Mimi's shapes come from a random Mimi built with moshi (as the tests build it), or --mimi.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Literal, Optional

import tyro

from csm_jax.engine import FRAMES_PER_CALL

GB = 1e9


@dataclasses.dataclass
class Args:
    slots: int = 1024
    size: Literal["tiny", "csm-1b"] = "csm-1b"
    """Shapes of csm.CsmConfig.csm_1b() or tiny()."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """CSM's parameters and state (Mimi stays float32, as the server runs it)."""
    frames_per_call: int = FRAMES_PER_CALL
    workers: int = 0
    """Programs compiled at once (0: one per core, as the server does; 1: one by one, for per-program seconds
    that do not overlap)."""
    warm_cache: bool = True
    """Also compile again from the on-disk cache the cold pass filled (a restart)."""
    mimi: Optional[str] = None
    """A Mimi checkpoint for its shapes (default: a random Mimi built with moshi)."""
    tokenizer: Optional[str] = None
    """Llama-3 tokenizer.json (default: the one scripts/test.sh fetches); only a bundle's formality here."""


def abstract_bundle(args: Args):
    """A ModelBundle whose CSM and Mimi parameters are shapes only (jax.ShapeDtypeStruct)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from csm_jax import csm
    from csm_jax.bundle import ModelBundle
    from csm_jax.mimi import load_mimi, mimi_params_from_tensors
    from csm_jax.testing.inputs import tokenizer_file

    cfg = csm.CsmConfig.csm_1b() if args.size == "csm-1b" else csm.CsmConfig.tiny()
    params = jax.eval_shape(lambda: csm.init_params(cfg, jax.random.key(0), jnp.dtype(args.dtype)))
    if args.mimi:
        mimi = load_mimi(args.mimi)[1]
    else:
        from csm_jax.testing.random_mimi import build_moshi_mimi

        sd = {k: v.detach().numpy() for k, v in build_moshi_mimi(seed=0).state_dict().items()}
        mimi = mimi_params_from_tensors({k: np.asarray(v) for k, v in sd.items()}, "random moshi Mimi")[1]
    mimi = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mimi)
    return ModelBundle.from_parts(cfg, params, mimi, tokenizer_file(args.tokenizer))


def compile_pass(programs, state, mimi_state, workers: int) -> tuple[float, dict]:
    """Compiles every program of the table -> (wall seconds, {what: (seconds, memory analysis)}). A program's
    seconds run from the previous one's end to its own: its compile time when they compile one by one; with
    several at once they overlap (None)."""
    ends = {}
    t0 = time.perf_counter()
    compiled = programs.compile(state, mimi_state, lambda done, total, what: ends.setdefault(
        what, time.perf_counter()), workers)
    wall = time.perf_counter() - t0
    starts = dict(zip(sorted(ends, key=ends.get), [t0] + sorted(ends.values())))
    return wall, {p.what: (ends[p.what] - starts[p.what] if workers == 1 else None, c.memory_analysis())
                  for p, c in compiled}


def main(args: Args) -> None:
    import jax
    import jax.numpy as jnp

    from csm_jax import csm
    from csm_jax.mimi import init_decoder_state
    from csm_jax.programs import Programs

    cache = tempfile.mkdtemp(prefix="csm-startup-cache-")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    model = abstract_bundle(args)
    state = jax.eval_shape(lambda: csm.GenState.create(model.cfg, args.slots, jnp.dtype(args.dtype)))
    mimi_state = jax.eval_shape(lambda: init_decoder_state(model.mimi, args.slots))
    size = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    programs = Programs(model, args.slots, args.frames_per_call)
    workers = args.workers or os.cpu_count() or 1
    device = jax.devices()[0]
    print(f"{args.size} at {args.slots} slots, {args.dtype}, {args.frames_per_call} frames per call, on "
          f"{device.device_kind} ({jax.default_backend()}), {os.cpu_count()} cores, {workers} compiling at once")
    print(f"state: generation {size(state) / GB:.1f} GB, Mimi decoder {size(mimi_state) / GB:.2f} GB; "
          f"parameters {size(model.params) / GB:.2f} GB + Mimi {size(model.mimi) / GB:.2f} GB")
    cold, per = compile_pass(programs, state, mimi_state, workers)
    print(f"\n{'program':36s} {'compile s':>9s} {'temp GB':>8s} {'new out GB':>10s}")
    for what, (s, mem) in per.items():
        new_out = mem.output_size_in_bytes - mem.alias_size_in_bytes
        shown = "-" if s is None else f"{s:.1f}"
        print(f"{what:36s} {shown:>9s} {mem.temp_size_in_bytes / GB:8.3f} {new_out / GB:10.3f}")
    print(f"\n{len(per)} programs; cold compile cache: {cold:.1f} s wall")
    warm = None
    if args.warm_cache:
        jax.clear_caches()
        warm, _ = compile_pass(programs, state, mimi_state, workers)
        print(f"from the on-disk cache (a restart): {warm:.1f} s wall")
    print(json.dumps({"bench": "startup", "size": args.size, "slots": args.slots, "dtype": args.dtype,
                      "frames_per_call": args.frames_per_call, "backend": jax.default_backend(),
                      "device": device.device_kind, "cores": os.cpu_count(),
                      "workers": workers, "programs": len(per), "cold_s": round(cold, 1),
                      "warm_cache_s": None if warm is None else round(warm, 1),
                      "compile_s": {w: s and round(s, 2) for w, (s, _) in per.items()},
                      "temp_gb": {w: round(m.temp_size_in_bytes / GB, 3) for w, (_, m) in per.items()},
                      "state_gb": round((size(state) + size(mimi_state)) / GB, 2)}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
