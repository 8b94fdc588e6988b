"""Where a frame's device time goes: a JAX profiler trace of the frame program, op by op, in kernel classes.

  python benchmarks/profile_frame.py                                   # csm-1b (random weights), batch 1
  python benchmarks/profile_frame.py --size tiny                       # a quick check that it runs
  python benchmarks/profile_frame.py --batch 16 --frames-per-call 8 --out profile_b16
  python benchmarks/profile_frame.py --checkpoint DIR --quantize int8  # a checkpoint's weights, int8

Builds the model as bench_generate.py does (random weights at full csm-1b size by default, or a checkpoint
folder), compiles `csm.generate_frames` for `--frames-per-call` frames at `--batch` rows, warms up, times
`--calls` calls untraced (wall time per frame), then records a `jax.profiler` trace of `--calls` more calls.
The trace's op events are mapped to the compiled HLO (its instruction names and their op_name metadata, the
JAX scopes they come from) and summed per frame:

  class                           what it holds
  backbone layers                 the backbone's transformer (attention, MLP, norms, its cache writes)
  depth-decoder layers            the depth decoder's transformer, its attention excepted
  depth attention                 the depth decoder's attention (q/k/v projections and RoPE included)
  sampling                        top-k, temperature, random bits (threefry), argmax, for c0 and the 31 codebooks
  embeddings/projection/heads     embedding lookups, the depth projection, the c0 head and the 31 codebook heads
  copies/other                    loop carries, state updates, control flow and whatever has no scope

Per class: ops (kernels) per frame and microseconds per frame; then the ops themselves, the depth decoder's
kernels per codebook step, and the total op time per frame beside the wall time per frame. On a GPU or TPU
the device's lanes are read (one event per kernel, copies included); XLA:CPU has no device lanes: its ops
run as thunks on host threads, which are read instead (control-flow thunks left out: they span their body).
Several CPU threads may run ops at once, so there the op total can exceed the wall time. A kernel whose
event names no op of the program (its annotation missing, as may happen inside a CUDA graph) is listed as
unattributed under its kernel name; XLA_FLAGS=--xla_gpu_enable_command_buffer= turns the graphs off.

The classes are read from the scopes the model code names its parts with (`jax.named_scope` in csm_jax's
llama, csm and sampling; frame_ops.py lists them): the compiled HLO's op_name metadata holds them. An op
that lost its metadata in compilation (XLA:CPU's dots) is a head if it makes logits, else takes the class
of its nearest neighbours in the dataflow (marked "(from neighbours)" in the table).

Written to `--out`: the raw trace (`trace/plugins/profile/*/`: `.xplane.pb`, `.trace.json.gz` and
`perfetto_trace.json.gz`, which ui.perfetto.dev opens), the compiled HLO (`frame_hlo.txt`), the table
(`table.txt`) and every figure (`profile.json`, also the last line printed). Needs only jax and jaxlib (the
trace is read with `jax.profiler.ProfileData`, or from the `.trace.json.gz` where a jax lacks it); on NVIDIA
GPUs the trace's device lanes need CUPTI, which the CUDA plugin's pip wheels bring.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import time

import numpy as np
import tyro

from csm_jax.engine import FRAMES_PER_CALL
from frame_ops import CLASSES, depth_step, instruction_classes, missing_scopes, parse_hlo, sampling_part, short_scope
from trace_events import busy_ns, read_trace

UNATTRIBUTED = "unattributed"  # device events that name no op of the frame program (shown only when present)


@dataclasses.dataclass
class Args:
    size: str = "csm-1b"
    """Random weights at full csm-1b size, or tiny (test widths: a quick check that the script runs)."""
    checkpoint: str = ""
    """A CSM checkpoint (folder, .safetensors file or hub id) instead of random weights (--size is then ignored)."""
    batch: int = 1
    """Rows per frame step."""
    frames_per_call: int = FRAMES_PER_CALL
    """Frames per device call (one lax.scan), as the server's generation step."""
    calls: int = 3
    """Calls timed untraced, then the same number traced."""
    warmup: int = 2
    """Calls run after compiling, before anything is timed."""
    dtype: str = ""
    """float32 or bfloat16; default fp32 on CPU, bf16 elsewhere."""
    quantize: str = "none"
    """none or int8: weight-only int8 for the large matmul weights (csm_jax.quantize)."""
    out: str = "profile_frame"
    """Folder for the trace, the compiled HLO, the table and profile.json."""
    top: int = 40
    """Ops listed in the table (all of them are in profile.json)."""
    reanalyse: str = ""
    """Only redo the table and profile.json from a finished run's folder (its frame_hlo.txt, trace and
    profile.json), e.g. a device run's output read on another machine; nothing is run."""


_META = ("model", "batch", "dtype", "frames_per_call", "calls_traced", "backend", "device", "jax", "compile_s",
         "wall_us_per_frame", "traced_wall_us_per_frame", "num_codebooks", "audio_vocab_size")


def build(args):
    """(cfg, params, dtype, what) as bench_generate.py builds them, or from --checkpoint."""
    import jax
    import jax.numpy as jnp

    from csm_jax.checkpoints import compute_dtype
    from csm_jax.csm import CsmConfig, init_params

    t0 = time.perf_counter()
    if args.checkpoint:
        from csm_jax.checkpoints import load_csm

        ckpt = load_csm(args.checkpoint, args.dtype or None)
        cfg, params = ckpt.config, ckpt.params
        dtype = jax.tree.leaves(params["backbone"])[0].dtype
        what = f"checkpoint {ckpt.source}"
    else:
        if args.size not in ("csm-1b", "tiny"):
            raise SystemExit(f"error: --size {args.size}: use csm-1b or tiny")
        cfg = CsmConfig.tiny() if args.size == "tiny" else CsmConfig.csm_1b()
        dtype = compute_dtype(args.dtype or None)
        params = init_params(cfg, jax.random.key(0), dtype)
        what = f"random {args.size}"
    jax.block_until_ready(params)
    print(f"{what} parameters ({jnp.dtype(dtype).name}) in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.quantize != "none":
        from csm_jax.quantize import quantize_csm

        params = jax.block_until_ready(quantize_csm(params, args.quantize))
        what += f", {args.quantize} weights"
    return cfg, params, jnp.dtype(dtype), what


def main(args: Args) -> None:
    import jax
    import jax.numpy as jnp

    from csm_jax.testing.inputs import random_prompt

    if args.reanalyse:
        path = os.path.join(args.reanalyse, "profile.json")
        if not os.path.exists(path):
            raise SystemExit(f"error: --reanalyse {args.reanalyse}: no profile.json there (the folder of a run)")
        with open(path) as f:
            meta = {k: v for k, v in json.load(f).items() if k in _META}
        meta = {"num_codebooks": 32, "audio_vocab_size": 2051} | meta  # csm-1b's, if not recorded
        analyse(args.reanalyse, meta, args.top)
        return
    if args.quantize not in ("none", "int8"):
        raise SystemExit(f"error: --quantize {args.quantize}: use none or int8")
    if min(args.batch, args.frames_per_call, args.calls) < 1 or args.warmup < 0:
        raise SystemExit("error: --batch, --frames-per-call and --calls must be at least 1, --warmup at least 0")
    from csm_jax.csm import GenState, generate_frames, prefill, prefill_pieces, set_sampling

    cfg, params, dtype, what = build(args)
    B, F = args.batch, args.frames_per_call
    tokens, mask, S = random_prompt(B)
    frames_needed = F * (1 + args.warmup + 2 * args.calls)
    if S + frames_needed + 1 > cfg.max_seq_len:
        raise SystemExit(f"error: {frames_needed} frames after a {S}-row prompt exceed the {cfg.max_seq_len}-row "
                         "cache: lower --calls, --warmup or --frames-per-call")
    st = GenState.create(cfg, B, dtype)
    for t, m, n in prefill_pieces(tokens, mask, [S] * B):
        st = prefill(params, cfg, st, t, m, n)
    st = set_sampling(st, jnp.arange(B), jnp.full(B, 0.9), jnp.full(B, 50), jnp.arange(B),
                      jnp.full(B, frames_needed + 1))
    t0 = time.perf_counter()
    compiled = generate_frames.lower(params, cfg, st, F).compile()
    compile_s = time.perf_counter() - t0
    hlo = compiled.as_text()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "frame_hlo.txt"), "w") as f:
        f.write(hlo)
    print(f"compiled the frame program ({F} frames per call, batch {B}) in {compile_s:.1f} s", flush=True)

    valid_total = 0

    def calls(n, state):
        nonlocal valid_total
        for _ in range(n):
            state, frames, valid = compiled(params, state)
            valid_total += int(np.asarray(valid).sum())  # one host copy per call, as the server's loop
        return state

    st = calls(1 + args.warmup, st)
    t0 = time.perf_counter()
    st = calls(args.calls, st)
    wall_ns = (time.perf_counter() - t0) * 1e9
    trace_dir = os.path.join(args.out, "trace")
    t0 = time.perf_counter()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    try:
        st = calls(args.calls, st)
        jax.block_until_ready(st)
        traced_wall_ns = (time.perf_counter() - t0) * 1e9
    finally:
        try:
            jax.profiler.stop_trace()
        except ValueError as e:  # the .xplane.pb is written first; only the perfetto copy failed
            print(f"note: no perfetto_trace.json.gz ({e}); the .xplane.pb is read", flush=True)
    if valid_total != B * F * (1 + args.warmup + 2 * args.calls):
        raise SystemExit("error: a row ended early (an all-zero, end-of-speech frame), so fewer frames ran than "
                         "were timed: use fewer --calls or --frames-per-call")
    del st

    meta = {"model": what, "batch": B, "dtype": dtype.name, "frames_per_call": F, "calls_traced": args.calls,
            "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "compile_s": compile_s, "wall_us_per_frame": wall_ns / (args.calls * F) / 1e3,
            "traced_wall_us_per_frame": traced_wall_ns / (args.calls * F) / 1e3,
            "num_codebooks": cfg.num_codebooks, "audio_vocab_size": cfg.audio_vocab_size}
    analyse(args.out, meta, args.top)


def analyse(out: str, meta: dict, top: int) -> dict:
    """The table and profile.json from out/frame_hlo.txt and the trace under out/trace; `meta` holds what the
    run measured besides (wall times, sizes). Prints the table and the JSON line; returns the figures."""
    with open(os.path.join(out, "frame_hlo.txt")) as f:
        module, instrs, comps = parse_hlo(f.read())
    if not instrs:
        raise SystemExit(f"error: could not read the compiled HLO text in {out}/frame_hlo.txt (no instructions)")
    trace = read_trace(os.path.join(out, "trace"), module, instrs)
    frames = meta["calls_traced"] * meta["frames_per_call"]
    classes = instruction_classes(instrs, comps, meta["audio_vocab_size"])
    step_ops, trip = depth_step(instrs, comps)
    per_op = {}
    for op, _, dur, attributed in trace["events"]:
        if attributed:
            cls, scope, how = classes[op]
        elif re.search(r"mem(cpy|set)", op, re.I):  # a transfer no op of the program made (the host's reads)
            cls, scope, how = "copies/other", "", "(outside the program's ops)"
        else:
            cls, scope, how = UNATTRIBUTED, "", ""
        r = per_op.setdefault(op, {"op": op, "opcode": instrs[op].opcode if attributed else "", "class": cls,
                                   "scope": how + short_scope(scope), "count": 0, "ns": 0.0})
        r["count"] += 1
        r["ns"] += dur
    ops = sorted(per_op.values(), key=lambda r: -r["ns"])
    for r in ops:
        r["count_per_frame"] = r.pop("count") / frames
        r["us_per_frame"] = r.pop("ns") / frames / 1e3
        if r["class"] == "sampling":
            r["sampling_part"] = sampling_part(instrs[r["op"]], instrs, comps)
    names = list(CLASSES) + ([UNATTRIBUTED] if any(r["class"] == UNATTRIBUTED for r in ops) else [])
    by_class = {c: {"kernels_per_frame": sum(r["count_per_frame"] for r in ops if r["class"] == c),
                    "us_per_frame": sum(r["us_per_frame"] for r in ops if r["class"] == c)} for c in names}
    parts = collections.defaultdict(float)
    for r in ops:
        if "sampling_part" in r:
            parts[r["sampling_part"]] += r["us_per_frame"]
    depth_kernels = sum(r["count_per_frame"] for r in ops if "depth_decoder" in r["scope"] or r["op"] in step_ops
                        or r["class"] in ("depth-decoder layers", "depth attention"))
    step_kernels = sum(r["count_per_frame"] for r in ops if r["op"] in step_ops)
    lane = trace["lane"]
    if meta["backend"] != "cpu" and lane.startswith("host"):
        lane = ("NOT device time: the trace has no device lanes (on NVIDIA GPUs the profiler needs CUPTI), so the "
                "host's op events are read: " + lane)
    result = meta | {
        "lane": lane, "hlo_instructions": len(instrs), "unscoped": missing_scopes(instrs),
        "total_us_per_frame": sum(r["us_per_frame"] for r in ops),
        "busy_us_per_frame": busy_ns(trace["events"]) / frames / 1e3,
        "kernels_per_frame": sum(r["count_per_frame"] for r in ops), "classes": by_class,
        "sampling_parts": dict(parts), "depth_kernels_per_codebook": depth_kernels / (meta["num_codebooks"] - 1),
        "depth_step_kernels": step_kernels / trip if trip else None, "depth_step_trip_count": trip, "ops": ops,
    }
    table = format_table(result, top)
    print(table)
    with open(os.path.join(out, "table.txt"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "profile.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "ops"} | {"out": out}))
    return result


def format_table(r: dict, top: int) -> str:
    total = r["total_us_per_frame"] or 1.0
    lines = [f"Where a frame's time goes: {r['model']}, batch {r['batch']}, {r['dtype']}, on {r['backend']} "
             f"({r['device']}), jax {r['jax']}; {r['calls_traced']} calls of {r['frames_per_call']} frames traced",
             f"lane read: {r['lane']}",
             "",
             f"{'class':32s} {'kernels/frame':>13s} {'us/frame':>11s} {'%':>6s}"]
    for c, v in r["classes"].items():
        lines.append(f"{c:32s} {v['kernels_per_frame']:13.1f} {v['us_per_frame']:11.1f} "
                     f"{100 * v['us_per_frame'] / total:6.1f}")
        if c == "sampling":
            for part, us in sorted(r["sampling_parts"].items(), key=lambda x: -x[1]):
                lines.append(f"  {part:30s} {'':13s} {us:11.1f} {100 * us / total:6.1f}")
    lines.append(f"{'total (op time)':32s} {r['kernels_per_frame']:13.1f} {r['total_us_per_frame']:11.1f} "
                 f"{100.0:6.1f}")
    lines += [f"{'ops running (union of intervals)':32s} {'':13s} {r['busy_us_per_frame']:11.1f}",
              f"{'wall per frame, untraced':32s} {'':13s} {r['wall_us_per_frame']:11.1f}",
              f"{'wall per frame, traced':32s} {'':13s} {r['traced_wall_us_per_frame']:11.1f}",
              ""]
    step = (f"; the codebook scan's body runs {r['depth_step_kernels']:.1f} kernels per step "
            f"({r['depth_step_trip_count']} steps per frame)" if r["depth_step_kernels"] else "")
    lines.append(f"depth decoder: {r['depth_kernels_per_codebook']:.1f} kernels per codebook "
                 f"(its kernels per frame / 31: its scopes and its scan's body, sampling and loop copies "
                 f"included){step}")
    unattributed = r["classes"].get(UNATTRIBUTED, {}).get("us_per_frame", 0.0)
    if unattributed > 0.05 * total:
        lines.append(f"{unattributed:.0f} us per frame ran in kernels that name no op of the program (CUDA graphs "
                     "can hide their annotations): compare with XLA_FLAGS=--xla_gpu_enable_command_buffer=")
    if r["unscoped"]:
        lines.append(f"(scopes no op of the program names, so their ops fall elsewhere: {', '.join(r['unscoped'])})")
    lines += ["", f"top {min(top, len(r['ops']))} of {len(r['ops'])} ops by time per frame:",
              f"{'us/frame':>10s} {'n/frame':>8s} {'class':28s} {'op':40s} scope"]
    for o in r["ops"][:top]:
        lines.append(f"{o['us_per_frame']:10.1f} {o['count_per_frame']:8.1f} {o['class'][:28]:28s} "
                     f"{(o['op'] + ' ' + o['opcode'])[:40]:40s} {o['scope'][-90:]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
