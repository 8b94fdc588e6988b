"""The op events of one compiled program in a `jax.profiler` trace, with each event's own time.

On a GPU or TPU the device's lanes are read (one event per kernel, copies included); XLA:CPU has no device
lanes: its ops run as thunks on host threads, which are read instead (control-flow thunks left out: they span
their body). An event is matched to its HLO instruction by its hlo_op annotation, else by its kernel's name.
The trace is read with `jax.profiler.ProfileData`, or from the `.trace.json.gz` where a jax lacks it.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

import numpy as np

from frame_ops import CONTROL_FLOW

# Lines of a device plane that the profiler derives from the kernels (reading them too would count twice).
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "TensorFlow Ops", "TensorFlow Name Scope", "Framework Ops",
                 "Framework Name Scope", "Source code", "Launch Stats", "XLA TraceMe", "SparseCore")


def kernel_name(name: str) -> str:
    """The name XLA gives the kernel of an HLO instruction ('.' and other signs as '_')."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _self_times(events):
    """[(start, duration, item)] of one lane -> [(item, duration less the events nested inside it)]."""
    events = sorted(events, key=lambda e: (e[0], -e[1]))
    out = [[item, dur] for _, dur, item in events]
    stack = []  # indices of the open events
    for k, (start, dur, _) in enumerate(events):
        while stack and events[stack[-1]][0] + events[stack[-1]][1] <= start:
            stack.pop()
        if stack:
            out[stack[-1]][1] -= dur
        stack.append(k)
    return [(item, max(d, 0.0)) for item, d in out]


def load_planes(trace_dir: str) -> tuple[str, list]:
    """The newest trace under trace_dir as (file read, [(plane name, [(line name, [(event name, start ns,
    duration ns, stats dict)])])]): its .xplane.pb through jax.profiler.ProfileData (jaxlib's own reader),
    else (a jax without it) the .trace.json.gz the profiler writes beside it (pid = plane, tid = line)."""
    found = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb")), key=os.path.getmtime)
    if not found:
        raise SystemExit(f"error: the profiler wrote no .xplane.pb under {trace_dir}")
    try:
        from jax.profiler import ProfileData
    except ImportError:
        ProfileData = None
    if ProfileData is not None:
        data = ProfileData.from_file(found[-1])
        return found[-1], [(p.name, [(l.name, [(e.name, e.start_ns, e.duration_ns, dict(e.stats)) for e in l.events])
                                     for l in p.lines]) for p in data.planes]
    import gzip

    (path,) = glob.glob(os.path.join(os.path.dirname(found[-1]), "*.trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    planes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            planes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[e["pid"], e["tid"]] = e["args"]["name"]
    lines = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            lines[e["pid"], e.get("tid")].append((e["name"], e["ts"] * 1e3, e.get("dur", 0) * 1e3, e.get("args", {})))
    out = collections.defaultdict(list)
    for (pid, tid), evs in lines.items():
        out[planes.get(pid, str(pid))].append((threads.get((pid, tid), str(tid)), evs))
    return path, list(out.items())


def read_trace(trace_dir: str, module: str, instrs: dict) -> dict:
    """The op events of the frame program in the newest trace under trace_dir.

    Returns {"lane": what was read, "events": [(hlo op name or kernel name, start ns, self ns, attributed)]}.
    Device planes (/device:GPU:0, /device:TPU:0) are read when they hold events: their stream lines (one event
    per kernel or copy), else their XLA Ops line. Otherwise the host plane's XLA:CPU thunks, control flow
    excepted."""
    path, planes = load_planes(trace_dir)
    by_sanitized = {kernel_name(n): n for n in instrs}

    def op_of(name: str, stats: dict) -> str | None:
        """The instruction an event ran: its hlo_op annotation (the innermost of several joined), else its
        kernel's name (XLA names a fusion's kernel after it, '.' as '_'). An annotation that names a container
        (a command buffer's call, a loop) gives way to the kernel's own fusion when that is known."""
        hlo_op = stats.get("hlo_op")
        cands = [t.lstrip("%") for t in reversed(re.split(r"[;,\s]+", hlo_op))] if isinstance(hlo_op, str) else []
        cands += [name, name.lstrip("%"), by_sanitized.get(kernel_name(name), "")]
        found = [c for c in cands if c in instrs]
        leaf = [c for c in found if instrs[c].opcode not in CONTROL_FLOW]
        return (leaf or found or [None])[0]

    def ours(stats: dict) -> bool:
        m = stats.get("hlo_module")
        return not isinstance(m, str) or not module or module in m

    for plane, lines in planes:
        if not plane.startswith("/device:") or plane.startswith("/device:CUSTOM"):
            continue
        picked = [l for l in lines if l[0].startswith("Stream")]
        picked = picked or [l for l in lines if l[0] == "XLA Ops"]
        picked = picked or [l for l in lines if l[0] not in DERIVED_LINES]
        events = []
        for _, line in picked:
            lane = []
            for name, start, dur, stats in line:
                if not ours(stats):
                    continue
                op = op_of(name, stats)
                lane.append((start, dur, (op or name, start, op is not None)))
            events += [(item[0], item[1], d, item[2]) for item, d in _self_times(lane)]
        if events:
            names = ", ".join(sorted({l[0] for l in picked}))
            return {"lane": f"device {plane}: {names} (from {os.path.basename(path)})", "events": events}

    events, threads = [], 0
    for plane, lines in planes:
        if plane != "/host:CPU":
            continue
        for _, line in lines:
            lane = []
            for name, start, dur, stats in line:
                if "hlo_op" not in stats or not ours(stats):
                    continue
                op = op_of(name, stats)
                if op is not None and instrs[op].opcode in CONTROL_FLOW:
                    continue
                lane.append((start, dur, (op or str(stats["hlo_op"]), start, op is not None)))
            threads += bool(lane)
            events += [(item[0], item[1], d, item[2]) for item, d in _self_times(lane)]
    if not events:
        raise SystemExit("error: the trace holds no op events of the frame program: on an NVIDIA GPU the "
                         "profiler needs CUPTI (pip install the CUDA plugin's wheels: pip install -e '.[cuda]')")
    return {"lane": f"host threads (XLA:CPU runs ops as thunks on {threads} host threads; no device lanes; "
                    f"from {os.path.basename(path)})", "events": events}


def busy_ns(events) -> float:
    """Length of the union of the events' intervals (time during which at least one op ran)."""
    spans = sorted((s, s + d) for _, s, d, _ in events)
    total, end = 0.0, -np.inf
    for s, e in spans:
        if e > end:
            total += e - max(s, end)
            end = e
    return total
