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

The scopes come from wrapping a few functions of csm_jax (csm.depth_decoder, csm.sample, csm.embed_rows,
csm.backbone_logits, llama's forward passes `forward*` and attention functions `*atten*`) in `jax.named_scope`
before the program is traced: the computation is unchanged, only its HLO metadata is named. An op none of
them covers still lands in a class by its own scope names (`layerN` of llama's layers, threefry for random
bits). An op that lost its metadata in compilation (XLA:CPU's dots) is a head if it makes logits, else takes
the class of its nearest neighbours in the dataflow (marked "(from neighbours)" in the table).

Written to `--out`: the raw trace (`trace/plugins/profile/*/`: `.xplane.pb`, `.trace.json.gz` and
`perfetto_trace.json.gz`, which ui.perfetto.dev opens), the compiled HLO (`frame_hlo.txt`), the table
(`table.txt`) and every figure (`profile.json`, also the last line printed). Needs only jax and jaxlib (the
trace is read with `jax.profiler.ProfileData`, or from the `.trace.json.gz` where a jax lacks it); on NVIDIA
GPUs the trace's device lanes need CUPTI, which the CUDA plugin's pip wheels bring.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import json
import os
import re
import time

import numpy as np
import tyro

CLASSES = ("backbone layers", "depth-decoder layers", "depth attention", "sampling",
           "embeddings/projection/heads", "copies/other")
UNATTRIBUTED = "unattributed"  # device events that name no op of the frame program (shown only when present)
CONTROL_FLOW = ("while", "conditional", "call", "async-start", "async-done", "async-update")
# Lines of a device plane that the profiler derives from the kernels (reading them too would count twice).
DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "TensorFlow Ops", "TensorFlow Name Scope", "Framework Ops",
                 "Framework Name Scope", "Source code", "Launch Stats", "XLA TraceMe", "SparseCore")


@dataclasses.dataclass
class Args:
    size: str = "csm-1b"
    """Random weights at full csm-1b size, or tiny (test widths: a quick check that the script runs)."""
    checkpoint: str = ""
    """A CSM checkpoint (folder, .safetensors file or hub id) instead of random weights (--size is then ignored)."""
    batch: int = 1
    """Rows per frame step."""
    frames_per_call: int = 4
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


# ------------------------------------------------------------------------------------------------ scopes


def _scoped(fn, name):
    import jax

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.named_scope(name):
            return fn(*args, **kwargs)

    return wrapper


def name_scopes() -> list[str]:
    """Wraps the functions a frame is made of in named scopes (before the frame program is first traced):
    csm's depth decoder, sampling, embeddings and c0 head, and llama's forward passes (every `forward*`) and
    attention functions (every name with "atten": `_attention*`, `_attend`; a scope around a helper such as
    `attention_windows` names nothing and costs nothing). Returns the ones not found (their ops fall back to
    their own scopes)."""
    import inspect

    from csm_jax import csm, llama

    missing = []
    for attr, scope in (("depth_decoder", "depth_decoder"), ("sample", "sampling"), ("embed_rows", "embed_rows"),
                        ("backbone_logits", "c0_head")):
        fn = getattr(csm, attr, None)
        if callable(fn):
            setattr(csm, attr, _scoped(fn, scope))
        else:
            missing.append(f"csm.{attr}")
    for match, scope, what in ((lambda n: n.startswith("forward"), "transformer", "forward*"),
                               (lambda n: "atten" in n, "attention", "*atten*")):
        found = [n for n, fn in vars(llama).items() if match(n) and inspect.isfunction(fn)
                 and fn.__module__ == llama.__name__]
        for n in found:
            setattr(llama, n, _scoped(getattr(llama, n), scope))
        if not found:
            missing.append(f"llama.{what}")
    return missing


def _in_transformer(s: str) -> bool:
    return "/transformer" in s or re.search(r"(^|/)layer\d+(/|$)", s) is not None


def classify(op_name: str, opcode: str = "") -> str:
    """The class of one HLO instruction from its op_name metadata (the JAX scopes it was traced in)."""
    s = op_name
    if opcode in CONTROL_FLOW:
        return "copies/other"
    if "/sampling" in s or any(r in s for r in ("threefry", "random_bits", "random_split", "random_fold_in",
                                                "_gumbel", "_uniform", "categorical")):
        return "sampling"
    if "depth_decoder" in s:
        if _in_transformer(s):
            return "depth attention" if "/attention" in s else "depth-decoder layers"
        if any(p in s for p in ("dot_general", "gather", "dynamic_slice", "/cond", "switch", "take")):
            return "embeddings/projection/heads"  # audio_embed lookups, the projection, the 31 heads
        return "copies/other"
    if _in_transformer(s):
        return "backbone layers"
    if "embed_rows" in s or "c0_head" in s:
        return "embeddings/projection/heads"
    return "copies/other"


def sampling_part(instr, instrs: dict, comps: dict) -> str:
    """Which part of sampling an op belongs to (a finer split of the sampling class): an argmax is a
    variadic reduce over (value, iota index), whether it picks the greedy code or the Gumbel draw."""
    op_name = instr.op_name
    inner = [instrs[n] for c in instr.called for n in comps.get(c, ())]
    if "argmax" in op_name or (any(i.opcode == "iota" for i in inner) and any(
            i.opcode == "reduce" and i.shape.startswith("(") for i in inner + [instr])):
        return "argmax (greedy and the draw)"
    if any(r in op_name for r in ("threefry", "random_bits", "random_split", "random_fold_in", "_gumbel",
                                  "_uniform", "categorical")):
        return "random bits (threefry, Gumbel)"
    if any(r in op_name for r in ("top_k", "sort", "kth_largest", "bisection")):
        return "top-k"
    return "masks, temperature, selects"


# ------------------------------------------------------------------------------------------------ HLO

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass
class Instr:
    name: str
    opcode: str
    op_name: str
    computation: str
    called: list
    trip_count: int | None
    operands: list = dataclasses.field(default_factory=list)
    shape: str = ""


def parse_hlo(text: str) -> tuple[str, dict, dict]:
    """Compiled HLO text -> (module name, instruction name -> Instr, computation -> its instruction names)."""
    module = ""
    instrs: dict[str, Instr] = {}
    comps: dict[str, list] = collections.defaultdict(list)
    comps_names: dict[str, set] = {}  # operands are defined before their users within a computation
    comp = ""
    for line in text.splitlines():
        if line.startswith("HloModule "):
            module = line.split()[1].rstrip(",")
            continue
        m = _HEADER.match(line) if not line.startswith(" ") else None
        if m:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m or not comp:
            continue
        name, shape, opcode, rest = m.groups()
        depth, end = 1, len(rest)
        for k, ch in enumerate(rest):  # the operand list: up to the parenthesis that closes opcode(
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                end = k
                break
        operands = [t for t in re.findall(r"%?([\w.\-]+)", rest[:end]) if t in comps_names.get(comp, ())]
        called = _CALLED.findall(rest[end:])
        for group in _BRANCHES.findall(rest):
            called += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        op = _OP_NAME.search(rest)
        trip = _TRIP.search(rest)
        instrs[name] = Instr(name, opcode, op.group(1) if op else "", comp, called,
                             int(trip.group(1)) if trip else None, operands, shape)
        comps[comp].append(name)
        comps_names.setdefault(comp, set()).add(name)
    return module, instrs, dict(comps)


def instruction_classes(instrs: dict, comps: dict, vocab: int) -> dict:
    """Instruction name -> (class, op_name, how it was inferred: "" when from its own metadata). A fusion
    without op_name metadata (its root has none) takes the most common class among the instructions it calls.
    An instruction with none at all (XLA:CPU's dots lose theirs) is a head if it makes logits (a last
    dimension of `vocab`), else takes the class of its nearest neighbours in the dataflow that have one
    (operands and users, up to 4 hops; between two classes, the more specific)."""

    @functools.lru_cache(maxsize=None)
    def votes(comp: str, depth: int = 0) -> tuple:
        c = collections.Counter()
        for n in comps.get(comp, ()):
            i = instrs[n]
            if i.op_name:
                c[classify(i.op_name, i.opcode)] += 1
            elif depth < 4:
                for sub in i.called:
                    c.update(dict(votes(sub, depth + 1)))
        return tuple(c.items())

    def own(n: str):
        i = instrs[n]
        if i.op_name:
            return classify(i.op_name, i.opcode), i.op_name
        c = collections.Counter()
        for sub in i.called:
            c.update(dict(votes(sub)))
        if i.opcode in CONTROL_FLOW or not c:
            return None
        inner = [instrs[x].op_name for sub in i.called for x in comps.get(sub, ()) if instrs[x].op_name]
        return c.most_common(1)[0][0], inner[-1] if inner else ""

    users = collections.defaultdict(list)
    for n, i in instrs.items():
        for o in i.operands:
            users[o].append(n)
    known = {n: own(n) for n in instrs}

    # Where an op sits between two classes (a q/k/v or output projection between a layer's norm and its
    # attention, the depth projection between an embedding lookup and a layer), the more specific one wins.
    specific = ("sampling", "depth attention", "embeddings/projection/heads", "depth-decoder layers",
                "backbone layers")

    def nearest(n: str):
        """(class, op_name) of the nearest neighbours with metadata, operands and users alike, or None."""
        seen, frontier = {n}, [n]
        for _ in range(4):
            frontier = [y for x in frontier for y in instrs[x].operands + users[x] if y not in seen]
            seen.update(frontier)
            found = [known[y] for y in frontier if known[y] and known[y][0] in specific]
            if found:
                return min(found, key=lambda k: specific.index(k[0]))
        return None

    out = {}
    for n, i in instrs.items():
        if known[n]:
            out[n] = known[n] + ("",)
        elif i.opcode in CONTROL_FLOW:
            out[n] = ("copies/other", "", "")
        elif (i.opcode in ("dot", "convolution", "custom-call", "fusion")
              and re.search(rf"\[(?:\d+,)*{vocab}\]", i.shape)):
            out[n] = ("embeddings/projection/heads", "", "(makes logits: a head)")
        else:
            plumbing = i.opcode in ("copy", "get-tuple-element", "tuple", "parameter", "bitcast")
            near = None if plumbing else nearest(n)
            out[n] = (near[0], near[1], "(from neighbours) ") if near else ("copies/other", "", "")
    return out


def depth_step(instrs: dict, comps: dict) -> tuple[set, int | None]:
    """The instructions run once per codebook step of the depth decoder's scan (its while body and what that
    calls), and the scan's trip count; (empty, None) if the compiled program has no such loop."""
    loops = [i for i in instrs.values() if i.opcode == "while" and "depth_decoder" in i.op_name
             and classify(i.op_name) != "sampling"]
    if not loops:
        return set(), None
    loop = min(loops, key=lambda i: len(i.op_name))  # the outermost: the codebook scan itself
    body = [c for c in loop.called if c in comps]
    seen, todo, names = set(), list(body), set()
    while todo:
        comp = todo.pop()
        if comp in seen:
            continue
        seen.add(comp)
        for n in comps[comp]:
            names.add(n)
            todo += instrs[n].called
    return names, loop.trip_count


def short_scope(op_name: str) -> str:
    """op_name without the program's and the loops' own segments (jit(..), while/body, closed_call)."""
    parts = [p for p in op_name.split("/") if p not in ("while", "body", "closed_call", "cond", "branch_0_fun")]
    return "/".join(parts[1:] if parts and parts[0].startswith("jit(") else parts)


# ------------------------------------------------------------------------------------------------ trace


def _sanitize(name: str) -> str:
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
    by_sanitized = {_sanitize(n): n for n in instrs}

    def op_of(name: str, stats: dict) -> str | None:
        """The instruction an event ran: its hlo_op annotation (the innermost of several joined), else its
        kernel's name (XLA names a fusion's kernel after it, '.' as '_'). An annotation that names a container
        (a command buffer's call, a loop) gives way to the kernel's own fusion when that is known."""
        hlo_op = stats.get("hlo_op")
        cands = [t.lstrip("%") for t in reversed(re.split(r"[;,\s]+", hlo_op))] if isinstance(hlo_op, str) else []
        cands += [name, name.lstrip("%"), by_sanitized.get(_sanitize(name), "")]
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


# ------------------------------------------------------------------------------------------------ run

_META = ("model", "batch", "dtype", "frames_per_call", "calls_traced", "backend", "device", "jax", "compile_s",
         "wall_us_per_frame", "traced_wall_us_per_frame", "num_codebooks", "audio_vocab_size", "unscoped")



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
        meta = {"num_codebooks": 32, "audio_vocab_size": 2051, "unscoped": []} | meta  # csm-1b's, if not recorded
        analyse(args.reanalyse, meta, args.top)
        return
    if args.quantize not in ("none", "int8"):
        raise SystemExit(f"error: --quantize {args.quantize}: use none or int8")
    if min(args.batch, args.frames_per_call, args.calls) < 1 or args.warmup < 0:
        raise SystemExit("error: --batch, --frames-per-call and --calls must be at least 1, --warmup at least 0")
    missing = name_scopes()  # before anything traces the frame program
    from csm_jax.csm import GenState, generate_frames, prefill, prefill_pieces, set_sampling

    if missing:
        print(f"note: not found, left unscoped: {', '.join(missing)}", flush=True)
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
            "num_codebooks": cfg.num_codebooks, "audio_vocab_size": cfg.audio_vocab_size, "unscoped": missing}
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
        "lane": lane, "hlo_instructions": len(instrs),
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
        lines.append(f"(not found, so unscoped: {', '.join(r['unscoped'])})")
    lines += ["", f"top {min(top, len(r['ops']))} of {len(r['ops'])} ops by time per frame:",
              f"{'us/frame':>10s} {'n/frame':>8s} {'class':28s} {'op':40s} scope"]
    for o in r["ops"][:top]:
        lines.append(f"{o['us_per_frame']:10.1f} {o['count_per_frame']:8.1f} {o['class'][:28]:28s} "
                     f"{(o['op'] + ' ' + o['opcode'])[:40]:40s} {o['scope'][-90:]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
