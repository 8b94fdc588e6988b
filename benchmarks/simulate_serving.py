"""Serving simulated on a fake clock: the real driver, engine and schedule (admission, prefill groups,
pipelining) with the device replaced by a cost model (csm_jax.testing.stub_device), so the admission policy
can be tuned on a CPU; on a lent device, bench_server.py at the same load checks the model.

  python benchmarks/simulate_serving.py                                    # H100 cost model, 640 slots
  python benchmarks/simulate_serving.py --slots 1024 --at-once 256 1000 --poisson 100 200 300
  python benchmarks/simulate_serving.py --table h200.json                  # a device's own figures
  python benchmarks/simulate_serving.py --step-s 0.2 --slots 64            # constant step, prefill free

Scenarios: `--at-once N ...`: N requests arriving together at t = 0; `--poisson RATE ...`: requests arriving
as a Poisson process of RATE a second for `--seconds` (seeded). Every request asks for `--max-audio-ms` of audio
after a prompt of `--prompt-rows` rows (17: bench_server.py's default text). A request is submitted to the
driver when it arrives and the driver's steps run one after another as its thread runs them; the host's own
time (the engine's and the server's work per step) is not simulated, only the device's.

Printed per scenario: first audio (arrival to its first audio event; p50 and p95 by numpy's linear
interpolation, and the max); real-time streams: those whose audio never ran out once playing (a client plays
from its first audio, or `--start-buffer-ms` after it: it stalls when a chunk comes after the audio it had was
played) and the stall seconds of all streams together; requests that got less audio than they asked for (0
unless something is broken); the most slots one generation step ran; steps, prefill calls and simulated seconds
(and in the JSON the device's busy share and the schedule's deferrals). The last line printed is one JSON
object with every figure.

The cost model: a generation step of R rows (the rows the real programs compute: 1, 8, 64, 256 or every slot)
and F frames costs F x (frame(R) + mimi(R)); frame and mimi are linear between the table's points and beyond
the last by the last two's slope. A prefill call of n padded rows (a group of 64, 8 or 1 requests times a
piece of at most 128 rows, as the engine runs them) costs the longer of reading the backbone's weights (bf16,
at the table's bandwidth) and its matmuls (2 x backbone weights FLOPs per row, at the table's TFLOP/s);
attention over the prompts' few positions and the slot updates are left out. `--device h100` (default): the
H100 80GB HBM3 measured on 2026-11-25 (bf16, random csm-1b weights; benchmarks/README.md): frame from
bench_generate.py --frames-per-call 8 (1 row 10.47 ms, 16: 10.70, 64: 11.97, 256: 18.40, 512: 23.33), Mimi's
streaming decode step from bench_mimi.py (1 stream 1.87 ms, 64: 4.2, 256: 8.4), the roofline probe's 2,108
GB/s; prefill was not measured there: its 400 TFLOP/s (about 40% of the H100's dense bf16 peak) is an
assumption. `--device h200` is open until that device is measured: pass its figures with `--table FILE`
(JSON with TABLES["h100"]'s keys), e.g. the table benchmarks/cost_table.py measures on a device (accelerator.py's
cost_model stage writes it to OUT/cost_table.json and runs this simulation on it beside the server's figures).
`--step-s S`: every generation step S seconds and every prefill call free (or `--prefill-row-s` a padded row):
the cases that can be worked out by hand (tests/test_simulate_serving.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import tyro

from csm_jax import csm, llama
from csm_jax.audio import FRAME_MS, SAMPLE_RATE
from csm_jax.driver import Driver
from csm_jax.engine import FRAMES_PER_CALL, Engine
from csm_jax.programs import ROW_BUCKETS, bucket_rows
from csm_jax.request import Request, frames_for
from csm_jax.testing.stub_device import FakeClock, StubDevice, StubModel

TABLE_KEYS = ("device", "frame_ms", "mimi_ms", "read_gbs", "prefill_tflops")  # a cost table's keys
TABLES: dict[str, dict | None] = {
    "h100": {"device": "H100 80GB HBM3, bf16, random csm-1b weights, 2026-11-25",
             "frame_ms": [[1, 10.47], [16, 10.70], [64, 11.97], [256, 18.40], [512, 23.33]],
             "mimi_ms": [[1, 1.87], [64, 4.2], [256, 8.4]],
             "read_gbs": 2108.0, "prefill_tflops": 400.0},
    "h200": None,  # not measured yet: benchmarks/cost_table.py on it fills this in
}


@dataclasses.dataclass
class Args:
    slots: int = 640
    frames_per_call: int = FRAMES_PER_CALL
    prefill_rows: int = 8192
    """Padded prompt rows prefilled per step at most (the engine's and serve's default)."""
    max_prefill: Optional[int] = None
    """Requests prefilled per step at most (None: as many as the rows allow, the default)."""
    at_once: tuple[int, ...] = (1, 256)
    """Requests arriving together at t = 0: one scenario per count."""
    poisson: tuple[float, ...] = (50.0, 100.0, 200.0, 300.0)
    """Arrival rates, requests a second: one scenario per rate."""
    seconds: float = 20.0
    """How long the Poisson arrivals go on."""
    max_audio_ms: int = 4000
    """Audio each request asks for (random weights never end their speech sooner; nor does the cost model)."""
    prompt_rows: int = 17
    """Prompt rows of each request (17: bench_server.py's default text, no voice prompt)."""
    device: Literal["h100", "h200"] = "h100"
    """Cost table (see the module's docstring; h200 is open until measured: use --table)."""
    table: Optional[Path] = None
    """A JSON cost table with TABLES["h100"]'s keys, instead of --device's."""
    step_s: Optional[float] = None
    """Every generation step costs this many seconds, whatever its rows (instead of the table)."""
    prefill_row_s: float = 0.0
    """With --step-s: every padded prefill row costs this many seconds (0: prefill is free)."""
    seed: int = 0
    """Seed of the Poisson arrivals."""
    start_buffer_ms: int = 0
    """A client starts playing this long after its first audio (0: at once; bench_server.py's real-time count
    uses 300)."""


# ----------------------------------------------------------------------------------------------- cost model


def interpolate(points: list[list[float]], x: float) -> float:
    """Linear between the points [x, y] (x increasing), beyond the last by the last two's slope."""
    xs, ys = (np.array(v, float) for v in zip(*points))
    if x <= xs[-1] or len(xs) < 2:
        return float(np.interp(x, xs, ys))
    return float(ys[-1] + (x - xs[-1]) * (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]))


def backbone_weights() -> int:
    """csm-1b's backbone matmul weights: what a prefill call reads, and half its FLOPs per row."""
    leaves = [s for s in _shapes(llama.param_shapes(csm.CsmConfig.csm_1b().backbone)) if len(s) == 2]
    return sum(math.prod(s) for s in leaves)


def _shapes(tree) -> list[tuple]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in _shapes(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in _shapes(v)]
    return [tree]


def load_table(args: Args) -> dict:
    if args.table is not None:
        try:
            table = json.loads(args.table.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--table {args.table}: cannot read it as JSON ({e})")
        missing = set(TABLE_KEYS) - {"device"} - set(table)
        if missing:
            raise SystemExit(f"--table {args.table} lacks {sorted(missing)}: give the keys of TABLES['h100'] "
                             "(frame_ms and mimi_ms as [[rows, ms], ...], read_gbs, prefill_tflops)")
        return {"device": str(args.table), **table}
    if TABLES[args.device] is None:
        raise SystemExit(f"no cost figures for --device {args.device} yet (not measured): measure a table on it with "
                         "benchmarks/cost_table.py and pass it with --table FILE")
    return TABLES[args.device]


def cost_model(args: Args) -> tuple[Callable[[int], float], Callable[[int], float], str]:
    """-> (generation step seconds by rows, prefill call seconds by padded rows, the model's name)."""
    if args.step_s is not None:
        return (lambda rows: args.step_s), (lambda rows: rows * args.prefill_row_s), \
            f"constant: {args.step_s:g} s a step, {args.prefill_row_s:g} s a prefill row"
    table = load_table(args)
    return (*table_costs(table, args.frames_per_call), table["device"])


def table_costs(table: dict, frames_per_call: int) -> tuple[Callable[[int], float], Callable[[int], float]]:
    """A cost table's (generation step seconds by rows, prefill call seconds by padded rows): a step is F x
    (frame + Mimi decode step) at its rows; a prefill call the longer of reading the backbone's bf16 weights
    and its matmuls."""
    weights = backbone_weights()
    read_s = 2 * weights / (table["read_gbs"] * 1e9)  # bf16
    row_s = 2 * weights / (table["prefill_tflops"] * 1e12)

    def step_s(rows: int) -> float:
        return frames_per_call * (interpolate(table["frame_ms"], rows) + interpolate(table["mimi_ms"], rows)) / 1e3

    return step_s, (lambda rows: max(read_s, rows * row_s))


# ----------------------------------------------------------------------------------------------- simulation


def simulate(args: Args, arrivals: list[float]) -> dict:
    """The requests arriving at `arrivals` (seconds, sorted) through a driver and engine on a fake clock and
    the stub device -> the scenario's figures."""
    clock = FakeClock()
    step_s, prefill_s, _ = cost_model(args)
    device = StubDevice(args.slots, args.frames_per_call, clock, step_s, prefill_s)
    engine = Engine(StubModel(args.prompt_rows), args.slots, args.frames_per_call, max_prefill=args.max_prefill,
                    prefill_rows=args.prefill_rows, clock=clock, programs=device)
    driver = Driver(engine, max_queue=len(arrivals))
    chunks: list[list[tuple[float, float]]] = [[] for _ in arrivals]  # per request: (when, audio seconds)
    steps, most, errors = 0, 0, []

    def on_step(seconds: float, events: dict) -> None:
        nonlocal steps, most
        # The step ran the slots generating now and those whose last audio it read (they left `generating`).
        steps, most = steps + 1, max(most, len(engine.generating) + sum(ev.finished for ev in events.values()))

    def sink(i: int) -> Callable:
        def take(ev) -> None:
            if ev.error:
                errors.append(f"request {i}: {ev.error}")
            elif ev.audio.size:
                chunks[i].append((clock(), ev.audio.size / SAMPLE_RATE))
        return take

    driver.on_step = on_step
    submitted = 0

    def submit_due() -> None:
        nonlocal submitted
        while submitted < len(arrivals) and arrivals[submitted] <= clock():
            driver.submit(Request(f"request {submitted}", seed=submitted, max_audio_ms=args.max_audio_ms),
                          sink(submitted))
            submitted += 1

    while submitted < len(arrivals):
        clock.wait_until(arrivals[submitted])  # the device idles until the next request comes
        submit_due()
        for _ in driver.steps():
            submit_due()
    if errors:  # never from the stand-in device: the simulation itself is broken
        raise RuntimeError(f"{len(errors)} requests failed in the simulation, e.g. {errors[0]}")
    return figures(arrivals, chunks, frames_for(args.max_audio_ms) * FRAME_MS / 1000,
                   args.start_buffer_ms / 1000) | {
        "max_generating": most, "steps": steps, "prefill_calls": device.calls["prefill"],
        "simulated_s": clock(), "device_busy": sum(device.busy_s.values()) / clock() if clock() else 0.0,
        "deferrals": engine.schedule.deferrals}


def figures(arrivals: list[float], chunks: list[list[tuple[float, float]]], asked_s: float,
            buffer_s: float = 0.0) -> dict:
    """First audio, stalls and completeness of each request's chunks (when, audio seconds); playback starts
    `buffer_s` after the first audio."""
    first, stalls, short = [], [], 0
    for t0, got in zip(arrivals, chunks):
        if not got:
            short += 1
            continue
        first.append(got[0][0] - t0)
        played_to, stalled = got[0][0] + buffer_s, 0.0  # when the audio received so far runs out
        for t, seconds in got:
            stalled += max(0.0, t - played_to)
            played_to = max(played_to, t) + seconds
        stalls.append(stalled)
        short += sum(s for _, s in got) < asked_s - 1e-9
    first = np.array(first)
    pct = lambda q: float(np.percentile(first, q)) if first.size else None  # noqa: E731
    return {"requests": len(arrivals), "first_audio_p50_s": pct(50), "first_audio_p95_s": pct(95),
            "first_audio_max_s": float(first.max()) if first.size else None,
            "realtime_streams": sum(s <= 1e-9 for s in stalls), "stall_s": float(sum(stalls)), "short": short}


def poisson(rate: float, seconds: float, rng: np.random.Generator) -> list[float]:
    """Arrival times of a Poisson process of `rate` a second over [0, seconds)."""
    times, t = [], rng.exponential(1 / rate)
    while t < seconds:
        times.append(float(t))
        t += rng.exponential(1 / rate)
    return times


def main(args: Args) -> None:
    if args.slots < 1 or args.frames_per_call < 1 or args.prompt_rows < 1 or args.prefill_rows < 1 \
            or args.max_audio_ms < FRAME_MS or args.seconds <= 0 or any(n < 1 for n in args.at_once) \
            or any(r <= 0 for r in args.poisson) or (args.step_s is not None and args.step_s <= 0) \
            or args.prefill_row_s < 0 or args.start_buffer_ms < 0:
        raise SystemExit(f"give --slots, --frames-per-call, --prompt-rows, --prefill-rows and --at-once counts >= 1, "
                         f"--max-audio-ms >= {FRAME_MS} (one frame), --seconds and --poisson rates > 0, --step-s > 0 "
                         "and --prefill-row-s and --start-buffer-ms >= 0")
    step_s, prefill_s, model = cost_model(args)
    rng = np.random.default_rng(args.seed)
    scenarios = [(f"{n} at once", [0.0] * n) for n in args.at_once]
    scenarios += [(f"Poisson {rate:g}/s", poisson(rate, args.seconds, rng)) for rate in args.poisson]
    buckets = sorted({bucket_rows(n, args.slots) for n in (*ROW_BUCKETS, args.slots) if n <= args.slots})
    print(f"{args.slots} slots, {args.frames_per_call} frames a step ({args.frames_per_call * FRAME_MS} ms of audio), "
          f"{args.prefill_rows} prompt rows a step at most; requests of {args.max_audio_ms} ms after "
          f"{args.prompt_rows} prompt rows, played from {args.start_buffer_ms} ms after their first audio. "
          f"Cost model: {model}")
    print("  generation step: " + ", ".join(f"{r} rows {1e3 * step_s(r):.1f} ms" for r in buckets)
          + f"; prefill call: 64 x 32 rows {1e3 * prefill_s(2048):.2f} ms, 1 x 32 rows {1e3 * prefill_s(32):.2f} ms")
    print(f"{'scenario':16s} {'requests':>8s} {'first audio p50 / p95 / max s':>30s} {'real-time':>10s} "
          f"{'stall s':>8s} {'short':>5s} {'most gen.':>9s} {'steps':>6s} {'prefills':>8s} {'seconds':>8s}")
    results = []
    for name, arrivals in scenarios:
        r = {"scenario": name, **simulate(args, arrivals)}
        results.append(r)
        fmt = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9s}"  # noqa: E731
        print(f"{name:16s} {r['requests']:8d} {fmt(r['first_audio_p50_s'])} {fmt(r['first_audio_p95_s'])} "
              f"{fmt(r['first_audio_max_s'])} {r['realtime_streams']:10d} {r['stall_s']:8.2f} {r['short']:5d} "
              f"{r['max_generating']:9d} {r['steps']:6d} {r['prefill_calls']:8d} {r['simulated_s']:8.2f}")
    print(json.dumps({"bench": "simulate_serving", "cost_model": model, "slots": args.slots,
                      "frames_per_call": args.frames_per_call, "prefill_rows": args.prefill_rows,
                      "max_prefill": args.max_prefill, "max_audio_ms": args.max_audio_ms,
                      "prompt_rows": args.prompt_rows, "seed": args.seed, "start_buffer_ms": args.start_buffer_ms,
                      "step_ms": {str(r): 1e3 * step_s(r) for r in buckets}, "scenarios": results}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
