"""A device's cost table for the serving simulation, measured on it, and the simulation's figures beside the
server's measured ones.

  python benchmarks/cost_table.py CHECKPOINT table.json --slots 640
  python benchmarks/cost_table.py CHECKPOINT OUT/cost_table.json --figures OUT/figures.jsonl   # accelerator.py

Measured on the default device, with CHECKPOINT loaded as scripts/serve.py loads it (its compute dtype, `auto`:
bf16 on a GPU) and the serving engine's own programs (csm_jax.programs.Programs at --slots slots and
--frames-per-call frames, compiled as the server's warm-up compiles them, so a server run before with JAX's
on-disk cache leaves them compiled):

  read_gbs        the read bandwidth, as benchmarks/roofline.py measures it.
  mimi_ms         Mimi's streaming decode step (csm_jax.mimi.decode_step) on its own, at each row count below.
  frame_ms        the generation program (F frames and their Mimi decode, one program) at each row count it
                  runs at (1, 8, 64, 256 below the slots, and every slot: Programs.generate_rows), every slot
                  generating after the server's prompt; per frame, less Mimi's step: so the simulation's
                  F x (frame + mimi) is the measured program at each measured row count. Where Mimi is most of a
                  step (tiny sizes on a CPU) that difference is within the noise and can even come out negative.
  prefill_tflops  prefill calls into fresh slots, of the largest group the slots allow with the shortest and the
                  longest piece and of each smaller group with the shortest (64 x 32, 64 x 128, 8 x 32 and
                  1 x 32 rows at 64 slots or more); csm-1b's backbone matmul FLOPs (2 x its weights a row, as
                  the simulation counts them) over the seconds of the call with the most rows. Every call's
                  seconds beside what the simulation's prefill model gives for it from this table are in the
                  figures.

Each time is the median of --repeats calls after a first one (compiled, or read from the on-disk cache). The
table (OUT) has exactly simulate_serving.py's --table keys. Then the simulation runs on it
(simulate_serving.simulate, as `simulate_serving.py --table OUT` does) for requests arriving together at each
level the server was loaded with: the server's slots, frames per step, prefill rows, audio asked for and prompt
(bench_server.py's text, its prompt rows counted with CHECKPOINT's tokenizer), with bench_server.py's playback
buffer for the real-time count. The simulation leaves the host out (HTTP, the engine's and the server's work
per step); the server's figures include it. With --figures, the server's figures are read from that file (its
slots, from /health when it was ready, and each level's first audio p50/p95, real-time streams and audio seconds
per second), and each figure here is appended to it as it is known: the table with every time it comes from
("table"; also the serving programs' count and compile seconds), then predicted beside measured per level
("scenario"). Without server figures (not run, or failed) the slots come from --slots and the levels from
--levels (capped at the slots), with nothing measured to compare with. The last line printed is one JSON
object with every figure.

Expected on an H100 at full size (csm-1b, bf16, 640 to 1,024 slots): JAX start and the checkpoint ~30 s, the
bandwidth ~5 s, Mimi's step compiled at 5 row counts ~30 s (guessed), the serving programs ~20 s from the
server's on-disk cache (up to ~120 s cold), the timed calls ~10 s (a 4-frame step over 1,024 rows ~0.25 s),
the simulations a few seconds each on the host: ~100 s in all.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

from csm_jax.audio import FRAME_MS
from csm_jax.engine import FRAMES_PER_CALL
from csm_jax.request import frames_for

@dataclasses.dataclass
class Args:
    checkpoint: tyro.conf.Positional[Path]
    """The server's checkpoint folder (a random full-size csm-1b works: no figure depends on the weights)."""
    out: tyro.conf.Positional[Path]
    """The cost table, JSON, as simulate_serving.py --table reads it."""
    slots: str = "auto"
    """The server's slots (a number, or auto: the most the device's memory holds, as serve.py --slots auto);
    with --figures, the started server's own count wins."""
    frames_per_call: int = FRAMES_PER_CALL
    """Frames per step, as the server was started with."""
    prefill_rows: int = 8192
    """The server's --prefill-rows (its default)."""
    max_audio_ms: int = 4000
    """Audio each request of the levels asked for."""
    levels: tuple[int, ...] = (256, 1000, 64, 1)
    """Requests arriving together per scenario, when --figures has no server levels (capped at the slots)."""
    figures: Optional[Path] = None
    """A figures.jsonl (benchmarks/accelerator.py): the server's figures are read from it, and this one's appended."""
    repeats: int = 5
    """Timed calls per measurement (after one untimed)."""
    bandwidth_mb: int = 1024
    """Size of the bandwidth probe's matrix."""
    dtype: str = "auto"
    """CSM's compute dtype, as serve.py's --dtype (auto: bfloat16 on GPU/TPU, float32 on CPU)."""


# --------------------------------------------------------------------------------------------- timing


def median_ms(call, repeats: int) -> float:
    """`call()` (which blocks until its results are ready) once untimed, then the median of `repeats`, in ms."""
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_mimi(model, rows: list[int], repeats: int) -> dict[int, float]:
    """Mimi's streaming decode step on its own at each of `rows` streams, ms (every stream active)."""
    import jax
    import jax.numpy as jnp

    from csm_jax.mimi import decode_step, init_decoder_state

    out = {}
    for R in rows:
        state = [init_decoder_state(model.mimi, R)]
        codes = jnp.asarray(np.random.default_rng(R).integers(0, 2048, (R, 32)), jnp.int32)
        active = jnp.ones((R,), bool)

        def call():
            state[0], pcm = decode_step(model.mimi, state[0], codes, active)  # the state is donated
            jax.block_until_ready(pcm)

        out[R] = median_ms(call, repeats)
        print(f"Mimi decode step, {R} streams: {out[R]:.2f} ms", flush=True)
        del state[0]
    return out


class Serving:
    """The serving engine's programs and states at `slots` slots (csm_jax.programs), driven directly."""

    def __init__(self, model, slots: int, frames_per_call: int):
        from csm_jax.programs import Programs

        self.programs = Programs(model, slots, frames_per_call)
        self.state, self.mimi_state = model.new_state(slots), model.new_mimi_state(slots)
        self.slots = slots

    def compile(self) -> tuple[int, float]:
        """Every program of the table, as the server's warm-up compiles them: (programs, seconds)."""
        t0 = time.perf_counter()
        n = len(self.programs.compile(self.state, self.mimi_state))
        return n, time.perf_counter() - t0

    def reset(self, ids: list[int]) -> None:
        """The slots `ids` empty (position 0)."""
        import jax

        self.state = jax.block_until_ready(self.programs.reset(self.state, ids))

    def prefill(self, ids: list[int], rows: int) -> None:
        """`rows` prompt rows into each of the slots `ids` (zeros: their values change no time)."""
        import jax

        tokens, mask = np.zeros((len(ids), rows, 33), np.int32), np.ones((len(ids), rows, 33), bool)
        self.state = jax.block_until_ready(
            self.programs.prefill(self.state, ids, tokens, mask, np.full(len(ids), rows, np.int32)))

    def time_prefill(self, count: int, rows: int, repeats: int) -> float:
        """A prefill call of `count` requests x `rows` rows into fresh slots, ms (the reset before it untimed)."""
        ids, times = list(range(count)), []
        for i in range(repeats + 1):
            self.reset(ids)
            t0 = time.perf_counter()
            self.prefill(ids, rows)
            if i:
                times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def start_all(self, prompt_rows: int, max_frames: int) -> None:
        """Every slot after a prompt of `prompt_rows` rows, generating (up to `max_frames` frames)."""
        import jax

        ids = list(range(self.slots))
        self.reset(ids)
        self.prefill(ids, prompt_rows)
        self.state, self.mimi_state = self.programs.start(self.state, self.mimi_state, ids,
                                                          [(0.9, 50, i, max_frames) for i in ids])
        jax.block_until_ready((self.state, self.mimi_state))

    def time_generate(self, rows: int, repeats: int) -> float:
        """The generation program over `rows` generating slots (the first ones), ms per call; their positions
        are rewound after, so every row count runs at the prompt's positions (one attention window)."""
        import jax

        active = list(range(rows))

        def call():
            self.state, self.mimi_state, _, out = self.programs.generate(self.state, self.mimi_state, active)
            jax.block_until_ready(out)

        ms = median_ms(call, repeats)
        self.state = self.programs.rewind(self.state, active, [(repeats + 1) * self.programs.frames_per_call] * rows)
        return ms


def prefill_calls(counts: tuple[int, ...]) -> list[tuple[int, int]]:
    """The prefill calls timed, (requests, rows each), for the group sizes `counts` (largest first, as
    csm_jax.programs.group_counts gives them): the largest group with the shortest and the longest piece
    (csm.piece_sizes), each smaller group with the shortest (64 x 32, 64 x 128, 8 x 32, 1 x 32 at 64 slots
    or more)."""
    from csm_jax.csm import piece_sizes

    short, long = piece_sizes()[0], piece_sizes()[-1]
    return [(counts[0], short), (counts[0], long)] + [(c, short) for c in counts[1:]]


# ----------------------------------------------------------------------------------------- the figures


def server_figures(path: Optional[Path]) -> tuple[Optional[int], list[dict]]:
    """From a figures.jsonl: (the started server's slots from /health, None if it never became ready; its
    levels' figures, in order). The last server run in the file counts."""
    if path is None or not path.exists():
        return None, []
    slots, levels = None, []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if r.get("stage") != "server" or r.get("event") != "figure":
            continue
        if r.get("figure") == "ready":
            slots, levels = r["health"].get("slots"), []
        elif r.get("figure") == "level":
            levels.append(r)
    return slots, levels


def compare(predicted: dict, level: Optional[dict], asked_s: float) -> dict:
    """One scenario's simulated figures beside the server's measured ones (None: nothing measured)."""
    p = {"first_audio_p50_s": predicted["first_audio_p50_s"], "first_audio_p95_s": predicted["first_audio_p95_s"],
         "first_audio_max_s": predicted["first_audio_max_s"], "real_time_streams": predicted["realtime_streams"],
         "audio_s_per_wall_s": predicted["requests"] * asked_s / predicted["simulated_s"],
         "steps": predicted["steps"], "prefill_calls": predicted["prefill_calls"],
         "simulated_s": predicted["simulated_s"]}
    if level is None:
        return {"predicted": p, "measured": None}
    m = {"first_audio_p50_s": level["ttfb_p50_s"], "first_audio_p95_s": level["ttfb_p95_s"],
         "real_time_streams": level["real_time_streams"], "audio_s_per_wall_s": level["audio_s_per_wall_s"],
         "failed": level["failed"], "requests": level["requests"]}
    ratio = {k: m[k] / p[k] for k in ("first_audio_p50_s", "first_audio_p95_s", "audio_s_per_wall_s")
             if m[k] is not None and p[k]}
    return {"predicted": p, "measured": m, "measured_over_predicted": ratio}


def record(path: Optional[Path], figure: str, **values) -> None:
    """One figure as a JSON line appended to `path` at once (as bench_server.py's)."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"stage": "cost_model", "event": "figure", "figure": figure,
                            "time": round(time.time(), 3), **values}) + "\n")


def measure(args: Args, model, slots: int, prompt_rows: int, max_frames: int) -> tuple[dict, dict]:
    """The cost table of `model` on the default device at `slots` slots, and every time it comes from."""
    import jax
    import jax.numpy as jnp

    import roofline
    import simulate_serving as sim
    from csm_jax.programs import Programs

    t0, F = time.perf_counter(), args.frames_per_call
    read_gbs = roofline.read_bandwidth_gbs(args.bandwidth_mb)
    print(f"read bandwidth {read_gbs:.1f} GB/s", flush=True)
    rows = Programs(model, slots, F).generate_rows()
    mimi_ms = time_mimi(model, rows, args.repeats)  # before the serving state takes the device's memory

    serving = Serving(model, slots, F)
    programs, compile_s = serving.compile()
    print(f"{programs} serving programs compiled in {compile_s:.1f} s", flush=True)
    weights = sim.backbone_weights()  # the simulation's prefill model counts csm-1b's
    prefill = []
    for count, piece in prefill_calls(serving.programs.counts):
        ms = serving.time_prefill(count, piece, args.repeats)
        prefill.append({"requests": count, "rows_each": piece, "rows": count * piece, "ms": ms})
        print(f"prefill {count} x {piece} rows: {ms:.2f} ms", flush=True)
    biggest = max(prefill, key=lambda c: c["rows"])
    step_ms = {}
    serving.start_all(prompt_rows, (args.repeats + 1) * F * len(rows) + max_frames)
    for R in rows:
        step_ms[R] = serving.time_generate(R, args.repeats)
        print(f"generation step, {R} rows, {F} frames: {step_ms[R]:.2f} ms", flush=True)
    del serving

    dtype = jnp.dtype(model.params["text_embed"].dtype).name
    widths = "csm-1b" if model.cfg.backbone.dim == 2048 else "not csm-1b"
    table = {"device": f"{jax.devices()[0].device_kind}, {dtype}, {args.checkpoint.name} ({widths} widths), "
                       f"{slots} slots, {datetime.date.today().isoformat()}",
             "frame_ms": [[R, step_ms[R] / F - mimi_ms[R]] for R in rows],
             "mimi_ms": [[R, mimi_ms[R]] for R in rows], "read_gbs": read_gbs,
             "prefill_tflops": 2 * weights * biggest["rows"] / (biggest["ms"] / 1e3) / 1e12}
    assert tuple(table) == sim.TABLE_KEYS
    prefill_s = sim.table_costs(table, F)[1]
    for call in prefill:
        call["model_ms"] = prefill_s(call["rows"]) * 1e3
    costs = {"step_ms": [[R, step_ms[R]] for R in rows], "frames_per_call": F, "prefill_calls": prefill,
             "prompt_rows": prompt_rows, "programs": programs, "programs_compile_s": compile_s,
             "seconds": time.perf_counter() - t0}
    return table, costs


def simulate_levels(args: Args, slots: int, prompt_rows: int, levels: list[dict]) -> list[dict]:
    """The simulation on the table written to args.out for requests arriving together, one scenario per level
    the server was loaded with (its figures beside), else per --levels; each appended to --figures as it ends."""
    import bench_server
    import simulate_serving as sim

    if levels:
        scenarios = [(lv["requests"] if lv["requests"] == lv["clients"] else None, lv) for lv in levels]
    else:
        scenarios = [(min(n, slots), None) for n in args.levels]
    sim_args = sim.Args(slots=slots, frames_per_call=args.frames_per_call, prefill_rows=args.prefill_rows,
                        max_audio_ms=args.max_audio_ms, prompt_rows=prompt_rows, table=args.out,
                        start_buffer_ms=bench_server.Args().start_buffer_ms)
    asked_s = frames_for(args.max_audio_ms) * FRAME_MS / 1000
    results = []
    for n, level in scenarios:
        if n is None:  # each client sent several requests one after another: no arrivals all at once
            r = {"clients": level["clients"], "skipped": "the level's clients sent several requests each"}
        else:
            r = {"scenario": f"{n} at once", "requests": n, "slots": slots,
                 **compare(sim.simulate(sim_args, [0.0] * n), level, asked_s)}
        results.append(r)
        record(args.figures, "scenario", **r)
        print(json.dumps(r), flush=True)
    return results


def report(args: Args, table: dict, costs: dict, results: list[dict]) -> None:
    import bench_server

    F = args.frames_per_call
    print(f"\ncost table: {table['device']}; {F} frames a step; requests of {args.max_audio_ms} ms after "
          f"{costs['prompt_rows']} prompt rows; real-time with a {bench_server.Args().start_buffer_ms} ms playback "
          "buffer")
    print(f"{'rows':>6s} {'step ms':>9s} {'Mimi ms':>8s} {'frame ms':>9s}")
    for (R, step), (_, mimi), (_, frame) in zip(costs["step_ms"], table["mimi_ms"], table["frame_ms"]):
        print(f"{R:6d} {step:9.2f} {mimi:8.2f} {frame:9.2f}")
    print(f"read {table['read_gbs']:.0f} GB/s; prefill {table['prefill_tflops']:.1f} TFLOP/s; calls (measured, "
          "model): " + ", ".join(f"{c['requests']} x {c['rows_each']} rows {c['ms']:.2f} / {c['model_ms']:.2f} ms"
                                 for c in costs["prefill_calls"]))
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    print(f"{'scenario':14s} {'first audio p50 s':>19s} {'p95 s':>17s} {'real-time':>13s}   (predicted / measured)")
    for r in results:
        if "skipped" in r:
            print(f"{r['clients']} clients: {r['skipped']}")
            continue
        p, m = r["predicted"], r["measured"] or {}
        print(f"{r['scenario']:14s} {fmt(p['first_audio_p50_s']):>9s} / {fmt(m.get('first_audio_p50_s')):>7s} "
              f"{fmt(p['first_audio_p95_s']):>7s} / {fmt(m.get('first_audio_p95_s')):>7s} "
              f"{p['real_time_streams']:>5d} / {fmt(m.get('real_time_streams')):>5s}")


def main(args: Args) -> None:
    import jax

    import bench_server
    from csm_jax.bundle import ModelBundle

    if args.frames_per_call < 1 or args.repeats < 1 or args.max_audio_ms < FRAME_MS or args.prefill_rows < 1 \
            or args.bandwidth_mb < 1 or any(n < 1 for n in args.levels):
        raise SystemExit(f"give --frames-per-call, --repeats, --prefill-rows, --bandwidth-mb and --levels >= 1 and "
                         f"--max-audio-ms >= {FRAME_MS} (one frame)")
    if args.slots != "auto" and not (args.slots.isdigit() and int(args.slots) >= 1):
        raise SystemExit(f"--slots {args.slots}: give a number of slots (at least 1) or auto")
    served_slots, levels = server_figures(args.figures)
    t0 = time.perf_counter()
    model = ModelBundle(str(args.checkpoint), dtype=args.dtype)
    if served_slots is not None:
        slots, why = served_slots, "the started server's (its /health)"
    elif args.slots == "auto":
        try:
            slots, why = model.slots_that_fit()
        except ValueError as e:
            raise SystemExit(f"--slots auto: {e}") from None
    else:
        slots, why = int(args.slots), "--slots"
    print(f"{args.checkpoint} loaded in {time.perf_counter() - t0:.1f} s on {jax.devices()[0].device_kind}; "
          f"{slots} slots: {why}", flush=True)
    max_frames = frames_for(args.max_audio_ms)
    prompt_rows = model.prompt([], 0, bench_server.Args().text.strip(), max_frames)[0].shape[0]

    table, costs = measure(args, model, slots, prompt_rows, max_frames)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    record(args.figures, "table", table=str(args.out), **table, **costs)
    print(f"wrote {args.out}", flush=True)
    results = simulate_levels(args, slots, prompt_rows, levels)
    report(args, table, costs, results)
    print(json.dumps({"bench": "cost_table", "slots": slots, "table": table, **costs, "scenarios": results}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
