"""The accelerator's figures in one command: the headline first, then as many of the others as the time allows.

  python benchmarks/accelerator.py CHECKPOINT OUT --budget 480
  python benchmarks/accelerator.py CHECKPOINT OUT --quick              # tiny sizes: a check that it all runs
  python benchmarks/accelerator.py CHECKPOINT OUT --only server --slots 640

CHECKPOINT: a csm checkpoint folder for the server (a random full-size one works: no figure here depends on the
weights' values; the other stages make their own random weights, and run without it). Stages, in this order:

  generate_b1    batch-1 frames/s beside the bandwidth bound measured in the same run (bench_generate.py)
  server         one server started once (scripts/serve.py at --slots), loaded with 256, then 1,000 (capped at
                 its slots), then 64 and 1 concurrent streams of 4 s each (bench_server.py)
  cost_model     the serving simulation's cost table measured on this device at the server's slots, in its dtype
                 (OUT/cost_table.json: generation step by rows, Mimi's step by rows, read bandwidth, prefill
                 TFLOP/s), then simulate_serving.py on it for the server's levels, predicted beside measured
                 (cost_table.py)
  profile_b1     where a batch-1 frame's device time goes, kernel by kernel (profile_frame.py, trace in OUT/profile)
  int8           batch 1 with int8 weights and their greedy agreement with the unquantized ones (bench_generate.py)
  mimi           Mimi one-shot, streaming, and a 10-minute file's peak memory (bench_mimi.py)
  conversations  64 conversations, end of turn to first audio (bench_server.py; needs --turn-audio, --asr-model)
  train          one full-size training step: step time and model-FLOPs utilization (bench_train.py)

Every figure goes into OUT/figures.jsonl the moment it is measured, one JSON object a line: {"stage", "event",
"time", ...} with event "start" (expected_s, limit_s), "figure" (the stage's figures; the server writes its own,
one when it is ready and one per level as it ends; so does the cost model: its table, then one per level with
the simulation's first audio p50/p95 and real-time streams beside the server's), "end" (status: ok, failed
(exit N) or killed at its limit; seconds) or "skipped" (reason). A run cut short keeps every line written so
far. Each stage's output is in OUT/STAGE.log, the started server's own in OUT/serve.log
(serve_conversations.log); OUT/summary.txt and the last lines printed sum up.

Each stage declares its expected seconds (estimated from the H100 figures in benchmarks/README.md) and a time
limit. `--budget` is the seconds this command may take: a stage whose expected time exceeds what is left is
skipped (recorded, with the reason), a running one is stopped at its limit or at the budget's end, whichever
comes first (its process group killed, recorded), and the next stage goes on. The exit status is the number of
stages that failed or were killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import tyro

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("generate_b1", "server", "cost_model", "profile_b1", "int8", "mimi", "conversations", "train")


@dataclasses.dataclass
class Args:
    checkpoint: tyro.conf.Positional[Path]
    """A csm checkpoint folder for the server."""
    out: tyro.conf.Positional[Path]
    """Output folder: figures.jsonl, a log per stage, serve.log, summary.txt."""
    budget: float = 480.0
    """Seconds this command may take; stages that would not fit are skipped."""
    quick: bool = False
    """Tiny sizes, few frames, 4 slots and no server warm-up: checks that every stage runs (e.g. on a CPU); its
    figures are no measurement."""
    slots: str = ""
    """The server's --slots; default: `auto` where scripts/serve.py takes it, else from the device's memory
    (1,024 on 120 GB or more, 640 on 70 GB or more, else 256; 4 with --quick)."""
    levels: tuple[int, ...] = (256, 1000, 64, 1)
    """Concurrent streams per server level, in this order (each capped at the server's slots)."""
    max_audio_ms: int = 4000
    """Audio asked for per server request."""
    only: tuple[str, ...] = ()
    """Run only these stages (in the usual order); the rest are recorded as skipped."""
    turn_audio: Optional[Path] = None
    """A recording of spoken words for the conversations' user turns."""
    asr_model: str = ""
    """A faster-whisper model (name or folder) for the conversations."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    expected_s: float
    """Estimated seconds (compiles included)."""
    limit_s: float
    """Stopped after this long."""
    command: Callable[[float], list[str]]
    """The command, given the seconds it will be allowed."""
    figure: Optional[Callable[[dict], dict]] = None
    """The figures to record from the benchmark's last JSON line (None: it records its own, or none)."""
    skip: str = ""
    """Why it cannot run here (recorded as skipped)."""


def generate_figure(r: dict) -> dict:
    """bench_generate.py's batch-1 row beside the same run's roofline."""
    b1 = next(x for x in r["ours"] if x["batch"] == 1)
    keys = ("frames_per_s_stream", "bandwidth_bound_fps", "pct_of_bandwidth_bound", "rtf", "frame_ms",
            "frame_bound_ms", "backbone_step_ms", "backbone_bound_ms", "depth_decoder_ms", "depth_decoder_bound_ms",
            "sampling_ms", "other_ms", "ttff_s", "achieved_gbs")
    return {"size": r["size"], "quantize": r["quantize"], "jax": r["jax"], **{k: b1[k] for k in keys},
            "roofline": r["roofline"], "quantization_quality": r.get("quantization_quality")}


def stages(args: Args, slots: str) -> list[Stage]:
    py, out, q = sys.executable, args.out, args.quick
    bench = lambda name: str(ROOT / "benchmarks" / name)  # noqa: E731
    size = ["--size", "tiny"] if q else []
    frames = ["--frames", "8", "--frames-per-call", "4"] if q else ["--frames", "64", "--frames-per-call", "8"]
    gen = [py, bench("bench_generate.py"), *size, "--batches", "1", *frames]
    audio_ms, levels = (str(args.max_audio_ms), args.levels) if not q else ("320", (2, 4, 1))
    server = lambda log, load, extra: lambda limit: [  # noqa: E731
        py, bench("bench_server.py"), "--checkpoint", str(args.checkpoint), "--slots", slots,
        "--frames-per-call", "4", "--requests", "1", "--max-audio-ms", audio_ms,
        "--at-most-slots", "--figures", str(out / "figures.jsonl"), "--server-log", str(out / log),
        # it reports a server not ready in time itself, a minute before it would be killed
        "--startup-timeout", str(max(limit - 60, limit / 2)), *(["--no-warmup"] if q else []), *extra, *load]
    no_ckpt = "" if args.checkpoint.is_dir() else f"checkpoint folder not found: {args.checkpoint}"
    conv = no_ckpt or ("" if args.turn_audio and args.asr_model else "needs --turn-audio and --asr-model")
    # (name, expected s, limit s) on an H100 at full size; --quick: on a 2-core CPU at tiny sizes.
    return [
        Stage("generate_b1", *((60, 300) if q else (90, 130)), lambda _: gen, generate_figure),
        Stage("server", *((120, 400) if q else (240, 300)),
              server("serve.log", ["--clients", *map(str, levels)], []), skip=no_ckpt),
        # After the server, which compiled the same programs into JAX's on-disk cache (when it is set).
        Stage("cost_model", *((60, 300) if q else (100, 200)), lambda _: [
            py, bench("cost_table.py"), str(args.checkpoint), str(out / "cost_table.json"), "--slots", slots,
            "--frames-per-call", "4", "--max-audio-ms", audio_ms, "--figures", str(out / "figures.jsonl"),
            "--levels", *map(str, levels),
            *(["--repeats", "2", "--bandwidth-mb", "64"] if q else [])], skip=no_ckpt),
        Stage("profile_b1", *((90, 300) if q else (75, 150)), lambda _: [
            py, bench("profile_frame.py"), *size, "--batch", "1", "--frames-per-call", "8",
            "--out", str(out / "profile")], lambda r: r),
        Stage("int8", *((60, 300) if q else (120, 200)), lambda _: [
            *gen, "--quantize", "int8", "--agreement-frames", "16" if q else "200"], generate_figure),
        Stage("mimi", *((240, 600) if q else (90, 180)), lambda _: [
            py, bench("bench_mimi.py"), "--batches", "1", "--stream-frames", "20", "--repeats", "2",
            "--long-seconds", "30" if q else "600"], lambda r: r),
        Stage("conversations", *((240, 600) if q else (150, 240)),
              server("serve_conversations.log", [], ["--conversations", "2" if q else "64", "--turns", "2",
                          "--turn-audio", str(args.turn_audio), "--asr-model", args.asr_model]), skip=conv),
        Stage("train", *((90, 300) if q else (120, 200)), lambda _: [
            py, bench("bench_train.py"), *size, "--batches", "1", "--rows", "128" if q else "2048",
            "--depth-ratios", "0.0625", "--steps", "2" if q else "3"], lambda r: r),
    ]


class Recorder:
    """figures.jsonl, one line at a time, flushed as written; each line also printed."""

    def __init__(self, out: Path):
        self.path, self.t0 = out / "figures.jsonl", time.monotonic()

    def __call__(self, stage: str, event: str, **values) -> None:
        line = json.dumps({"stage": stage, "event": event, "time": round(time.time(), 3),
                           "t_s": round(time.monotonic() - self.t0, 1), **values})
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line if len(line) < 400 else line[:400] + " ...", flush=True)

    def left(self, budget: float) -> float:
        return budget - (time.monotonic() - self.t0)


def run_limited(command: list[str], log: Path, limit: float) -> tuple[Optional[int], float]:
    """Runs `command` in its own process group, output to `log`; (exit status or None when stopped at `limit`,
    seconds). Whatever of its group is left when it ends (a server it started) is stopped too."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        rc = proc.wait(timeout=max(limit, 1))
    except subprocess.TimeoutExpired:
        rc = None
    except BaseException:  # interrupted (Ctrl-C, or the SIGTERM handler below): leave nothing running
        _stop_group(proc)
        raise
    _stop_group(proc)
    return rc, time.monotonic() - t0


def _stop_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def last_json(log: Path) -> Optional[dict]:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_stages(plan: list[Stage], record: Recorder, budget: float, only: tuple[str, ...] = ()) -> int:
    """Runs `plan` in order, each stage's output in OUT/NAME.log, until `budget` seconds after `record` began
    (see the module docstring); the number of stages that failed or were stopped."""
    out, bad = record.path.parent, 0
    for st in plan:
        left = record.left(budget)
        reason = (st.skip or (f"not among --only {' '.join(only)}" if only and st.name not in only else "")
                  or (f"expected {st.expected_s:.0f} s, {max(left, 0):.0f} s of the budget left"
                      if st.expected_s > left else ""))
        if reason:
            record(st.name, "skipped", reason=reason)
            continue
        limit = min(st.limit_s, left)
        log = out / f"{st.name}.log"
        record(st.name, "start", expected_s=st.expected_s, limit_s=round(limit, 1), log=log.name)
        rc, seconds = run_limited(st.command(limit), log, limit)
        if rc == 0 and st.figure is not None:
            r = last_json(log)
            if r is None:
                rc = "no JSON line"
            else:
                record(st.name, "figure", **st.figure(r))
        status = "ok" if rc == 0 else (f"killed at its limit ({limit:.0f} s)" if rc is None
                                       else f"failed ({rc if isinstance(rc, str) else f'exit {rc}'})")
        tail = [] if rc == 0 else log.read_text(errors="replace").splitlines()[-5:]
        record(st.name, "end", status=status, seconds=round(seconds, 1), **({"log_tail": tail} if tail else {}))
        bad += rc != 0
    return bad


def device_slots(quick: bool) -> tuple[str, str]:
    """(--slots for the server, why): `auto` where serve.py takes it, else a number from the device's memory."""
    if quick:
        return "4", "--quick"
    if serve_takes_auto():
        return "auto", "scripts/serve.py --slots auto"
    mib = gpu_memory_mib()
    if mib is None:
        return "256", "no GPU memory figure (nvidia-smi)"
    n = 1024 if mib >= 120_000 else 640 if mib >= 70_000 else 256
    return str(n), f"{mib} MiB of device memory; scripts/serve.py takes no --slots auto"


def serve_takes_auto() -> bool:
    """Whether scripts/serve.py's --slots takes `auto` (its row in --help says so)."""
    try:
        help_text = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--help"],
                                   capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    except subprocess.TimeoutExpired:
        return False
    option = re.search(r"^\W*--slots\b(.*?)(?=^\W*--[a-z]|\Z)", help_text, re.S | re.M)
    return bool(option) and "auto" in option.group(1)


def nvidia_smi(*query: str) -> list[str]:
    """nvidia-smi's CSV lines for `query` (no header); [] without it or when it fails."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        r = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                           timeout=30)
    except (subprocess.TimeoutExpired, OSError):
        return []
    return r.stdout.strip().splitlines() if r.returncode == 0 else []


def gpu_memory_mib() -> Optional[int]:
    """The first GPU's memory in MiB (None: unknown)."""
    try:
        return int(nvidia_smi("--query-gpu=memory.total")[0].strip())
    except (IndexError, ValueError):
        return None


def device_info() -> dict:
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(), "jax_platforms": os.environ.get("JAX_PLATFORMS"),
            "gpus": nvidia_smi("--query-gpu=name,memory.total,driver_version")}


def summary(out: Path) -> str:
    """The figures.jsonl of a run, as a few lines."""
    lines = []
    for r in map(json.loads, (out / "figures.jsonl").read_text().splitlines()):
        s, e = r["stage"], r["event"]
        if e == "skipped":
            lines.append(f"{s}: skipped ({r['reason']})")
        elif e == "end":
            lines.append(f"{s}: {r['status']} after {r['seconds']:.0f} s")
        elif e == "figure" and s in ("generate_b1", "int8"):
            lines.append(f"  batch 1: {r['frames_per_s_stream']:.1f} frames/s, bandwidth bound "
                         f"{r['bandwidth_bound_fps']:.1f} ({r['pct_of_bandwidth_bound']:.0f}%; read "
                         f"{r['roofline']['read_gbs']:.0f} GB/s on {r['roofline']['device']})")
        elif e == "figure" and r.get("figure") == "ready":
            lines.append(f"  server ready in {r['ready_s']:.1f} s with {r['health'].get('slots')} slots")
        elif e == "figure" and r.get("figure") == "level":
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"  {r['clients']:5d} streams: {r['failed']} failed, first audio p50 {fmt(r['ttfb_p50_s'])} "
                         f"s p95 {fmt(r['ttfb_p95_s'])} s, {r['audio_s_per_wall_s']:.1f} audio s/s, "
                         f"{r['real_time_streams']} real-time, sent over {r.get('start_spread_s', 0):.2f} s")
        elif e == "figure" and r.get("figure") == "error":
            lines.append(f"  server: {r['error'].splitlines()[0]}")
        elif e == "figure" and r.get("figure") == "table":
            lines.append(f"  cost table {r['table']}: {r['frames_per_call']}-frame step " + ", ".join(
                f"{R} rows {ms:.1f} ms" for R, ms in r["step_ms"]) + "; Mimi step " + ", ".join(
                f"{R} rows {ms:.1f} ms" for R, ms in r["mimi_ms"]) + f"; read {r['read_gbs']:.0f} GB/s; prefill "
                f"{r['prefill_tflops']:.1f} TFLOP/s")
        elif e == "figure" and r.get("figure") == "scenario" and "predicted" in r:
            p, m = r["predicted"], r["measured"] or {}
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append(f"  {r['scenario']}, predicted / measured: first audio p50 {fmt(p['first_audio_p50_s'])} / "
                         f"{fmt(m.get('first_audio_p50_s'))} s, p95 {fmt(p['first_audio_p95_s'])} / "
                         f"{fmt(m.get('first_audio_p95_s'))} s, real-time {p['real_time_streams']} / "
                         f"{m.get('real_time_streams', '-')}")
        elif e == "figure" and s == "profile_b1":
            lines.append(f"  batch-1 frame: {r['total_us_per_frame']:.0f} us of ops, "
                         f"{r['wall_us_per_frame']:.0f} us wall")
        elif e == "figure" and s == "mimi" and "long" in r:
            x = r["long"]
            lines.append(f"  Mimi, {x['seconds']:.0f} s file: encode {x['encode_s_with_compile']:.1f} s, decode "
                         f"{x['decode_s_with_compile']:.1f} s, {x['peak_is']} {x['peak_mb']:.0f} MB")
        elif e == "figure" and s == "train":
            lines += [f"  training step: {x['step_s']:.3f} s, MFU {x['mfu']:.1%}" for x in r["results"]]
    return "\n".join(lines)


def main(args: Args) -> None:
    unknown = set(args.only) - set(STAGES)
    if unknown:
        raise SystemExit(f"error: --only {' '.join(sorted(unknown))}: the stages are {', '.join(STAGES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    if (args.out / "figures.jsonl").exists():
        raise SystemExit(f"error: {args.out}/figures.jsonl exists: give a new output folder")
    args.out, args.checkpoint = args.out.resolve(), args.checkpoint.resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout stops the stage under way too
    record = Recorder(args.out)
    record("device", "figure", **device_info(), budget_s=args.budget, quick=args.quick)
    slots, why = (args.slots, "--slots") if args.slots else device_slots(args.quick)
    record("server", "figure", figure="slots", slots=slots, why=why)
    bad = run_stages(stages(args, slots), record, args.budget, args.only)
    text = summary(args.out)
    (args.out / "summary.txt").write_text(text + "\n")
    print("\n" + text, flush=True)
    sys.exit(bad)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
