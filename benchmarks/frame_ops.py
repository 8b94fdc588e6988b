"""The ops of a compiled frame program and the kernel class each belongs to, read from its HLO text.

Each HLO instruction carries op_name metadata: the JAX scopes it was traced in. The model code names its
parts with `jax.named_scope`, and a class is read from those names:

  class                           scopes (the op_name holds ...)
  backbone layers                 transformer (llama.forward: attention, MLP, norms, cache writes), not depth_decoder
  depth-decoder layers            depth_decoder and transformer (llama.forward_shared), attention excepted
  depth attention                 depth_decoder, transformer and attention (q/k/v projections and RoPE included)
  sampling                        sampling (sampling.sample: top_k, argmax; codebook_noise: random_bits), or one of
                                  jax.random's own op names (the frame's key split)
  embeddings/projection/heads     embed_rows, c0_head, projection, heads (csm: lookups, the depth projection, heads)
  copies/other                    loop carries, state updates, control flow and whatever has no scope

An op that lost its metadata in compilation (XLA:CPU's dots) is a head if it makes logits, else takes the class
of its nearest neighbours in the dataflow (`instruction_classes`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

CLASSES = ("backbone layers", "depth-decoder layers", "depth attention", "sampling",
           "embeddings/projection/heads", "copies/other")
CONTROL_FLOW = ("while", "conditional", "call", "async-start", "async-done", "async-update")
# The model code's scopes the classes are read from; a compiled frame program holds every one of them.
SCOPES = ("transformer", "attention", "depth_decoder", "sampling", "top_k", "random_bits", "embed_rows", "c0_head",
          "projection", "heads")
HEADS = ("embed_rows", "c0_head", "projection", "heads")
RANDOM = ("threefry", "random_bits", "random_split", "random_fold_in", "_gumbel", "_uniform", "categorical")


def scopes(op_name: str) -> set:
    """The names an op_name is made of (several op_names may be joined by ';' in a fused instruction's)."""
    return set(re.split(r"[/;]", op_name))


def classify(op_name: str, opcode: str = "") -> str:
    """The class of one HLO instruction from its op_name metadata (the JAX scopes it was traced in)."""
    s = scopes(op_name)
    if opcode in CONTROL_FLOW:
        return "copies/other"
    if "sampling" in s or any(r in op_name for r in RANDOM):
        return "sampling"
    if s.intersection(HEADS):
        return "embeddings/projection/heads"
    if "transformer" in s:
        if "depth_decoder" in s:
            return "depth attention" if "attention" in s else "depth-decoder layers"
        return "backbone layers"
    return "copies/other"


def sampling_part(instr, instrs: dict, comps: dict) -> str:
    """Which part of sampling an op belongs to (a finer split of the sampling class): the noise's random bits,
    the top-k threshold, an argmax (a variadic reduce over (value, iota index): the greedy code or the Gumbel
    draw), or the rest."""
    op_name = instr.op_name
    if any(r in op_name for r in RANDOM):
        return "random bits (threefry, Gumbel)"
    if "top_k" in scopes(op_name):
        return "top-k"
    inner = [instrs[n] for c in instr.called for n in comps.get(c, ())]
    if "argmax" in op_name or (any(i.opcode == "iota" for i in inner) and any(
            i.opcode == "reduce" and i.shape.startswith("(") for i in inner + [instr])):
        return "argmax (greedy and the draw)"
    return "masks, temperature, selects"


def missing_scopes(instrs: dict) -> list[str]:
    """The SCOPES no instruction of the program names (their ops then fall to other classes)."""
    found = set().union(*(scopes(i.op_name) for i in instrs.values())) if instrs else set()
    return [s for s in SCOPES if s not in found]


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

