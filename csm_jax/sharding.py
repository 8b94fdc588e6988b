"""One mesh, the logical axes of every array that goes on it, and rules mapping them onto the mesh.

The mesh has two axes: "data" (independent streams: generation slots, Mimi streams, training examples) and
"model" (tensor parallelism inside a layer). Every array placed on a mesh is named once here by logical axes:
parameters and LoRA adapters (`PARAM_AXES`, by leaf name), the generation state (`STATE_AXES`, by csm.GenState
field), the streaming Mimi decoder state (`STREAM_AXES`: every leaf has the stream axis first) and a training
batch (`BATCH_AXES`). `RULES`, a flax logical-axis rules table (as MaxText's), maps each logical axis to a mesh
axis or to None (replicated); flax.linen's `logical_to_mesh_axes` applies it. Every path places through
these (`param_shardings`, `state_shardings`, `stream_shardings`, `batch_shardings`): the bundle and the engine
(serving), training and its checkpoints. The model code never sees the device count: the jitted functions of
csm.py follow their inputs' shardings (XLA inserts the collectives).

Specs are written without trailing Nones (P("data"), never P("data", None)): two equal placements then compare
equal, and a compiled program, keyed by its inputs' shardings, is reused rather than compiled again.

Tensor parallelism (Megatron's split of a Llama layer, weights stored (out, in)):
  wo (D, N*H) is split along its input "heads": each device holds whole query heads when N % model == 0
  w2 (D, M)   is split along its input "mlp": each device holds a contiguous block of MLP units
  wqkv ((N+2K)*H, D) and w13 (2M, D) are replicated. Their rows are fused (q|k|v, gate|up): a contiguous
  split of those rows would give one device only gate rows and another only up rows (or q heads on one
  device and v heads on another), so each device's shard would not be a self-contained piece of the layer
  and XLA would move activations between devices to rebuild q, k, v and gate*up. Their logical axes
  ("qkv", "gate_up") therefore map to None. Sharding them exactly needs a row order that interleaves per
  device (a load-time permutation), not done here.
  The products through wo and w2 then contract over a sharded axis: each device computes a partial sum and
  XLA adds them (an all-reduce), so tensor-parallel outputs equal one device's up to fp32 summation order.
Embeddings, heads, norms and the depth decoder's projection are replicated ("vocab", "embed" map to None).
A parameter dimension that its mesh axis's size does not divide is replicated rather than unevenly split.

Generation state: every field of csm.GenState has the slot (batch) axis first and is split along "data":
the backbone cache k, v (B, K, S, H) and its positions (B, S), h (B, D), pos, done, frame counts, sampling
settings and PRNG keys (B,). The cache's kv-head axis maps to None (the k, v projections are replicated).
The slot count must be a multiple of the "data" size (`check_split`: one check for slots, streams and
examples).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from csm_jax.csm import GenState

AXES = ("data", "model")

# Logical axis -> mesh axis (None: replicated), in flax's rules format. One table decides what is split.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("heads", "model"),     # attention output rows of wo's input: whole heads per device
    ("mlp", "model"),       # MLP units (w2's input)
    ("qkv", None),          # fused q|k|v rows of wqkv: replicated (see the module docstring)
    ("gate_up", None),      # fused gate|up rows of w13: replicated (see the module docstring)
    ("vocab", None),
    ("embed", None),
    ("dec_embed", None),
    ("kv_heads", None),
    ("seq", None),
    ("head_dim", None),
    ("lora_rank", None),    # LoRA adapters (training): a (rank, in), b (out, rank), replicated unless FSDP
    ("lora_in", None),
    ("lora_out", None),
    ("depth_frames", "data"),  # training: the frames the depth decoder trains on (whole if data does not divide)
)

# Parameter leaf name (the last dict key of its path in csm.param_shapes) -> logical axes, weights (out, in).
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "text_embed": ("vocab", "embed"),
    "audio_embed": ("vocab", "embed"),
    "c0_head": ("vocab", "embed"),
    "projection": ("dec_embed", "embed"),
    "audio_head": ("vocab", "dec_embed"),
    "attn_norm": ("embed",),
    "wqkv": ("qkv", "embed"),
    "wo": ("embed", "heads"),
    "mlp_norm": ("embed",),
    "w13": ("gate_up", "embed"),
    "w2": ("embed", "mlp"),
    "norm": ("embed",),
    "a": ("lora_rank", "lora_in"),    # LoRA adapter (csm_jax.train.lora): A (r, in)
    "b": ("lora_out", "lora_rank"),   # and B (out, r)
}

# csm.GenState field (and backbone cache entry) -> logical axes. Slots lead everywhere.
STATE_AXES: dict[str, tuple[str, ...]] = {
    "k": ("batch", "kv_heads", "seq", "head_dim"),
    "v": ("batch", "kv_heads", "seq", "head_dim"),
    "pos": ("batch",),          # GenState.pos (B,); the cache's pos (B, S) is below
    "cache_pos": ("batch", "seq"),
    "h": ("batch", "embed"),
    "done": ("batch",),
    "n_frames": ("batch",),
    "max_frames": ("batch",),
    "temperature": ("batch",),
    "topk": ("batch",),
    "key": ("batch",),
}

# The streaming Mimi decoder state (mimi.init_decoder_state): every leaf has the stream axis first, the rest whole.
STREAM_AXES: tuple[str, ...] = ("batch",)

# A training batch (csm_jax.train.data.collate). Training uses the same mesh and rules, plus two choices:
#  * data parallelism: a batch's examples split along "data" (logical "batch"), and so are the frames the
#    depth decoder trains on ("depth_frames"); the gradients are summed across "data" by XLA.
#  * FSDP (fully sharded data parallelism, ZeRO-3 style), optional: every matrix additionally splits its
#    largest dimension that the "data" size divides (and that the rules left unsplit) along "data", so each
#    device stores 1/data of the parameters, gradients and optimizer state; XLA gathers a weight where a
#    layer uses it. A matrix no dimension of which "data" divides stays as the rules place it; vectors
#    (norms) stay replicated. The optimizer state follows the parameters' shardings (train/placement.py).

BATCH_AXES: dict[str, tuple[str | None, ...]] = {
    "tokens": ("batch", "seq", None),
    "mask": ("batch", "seq", None),
    "labels": ("batch", "seq", None),
    "depth_rows": ("depth_frames", None),
    "depth_valid": ("depth_frames",),
}


# --------------------------------------------------------------------------------------------------- mesh


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default: jax.devices()). data=-1 takes every device left
    after `model`: make_mesh() is pure data parallelism, make_mesh(model=4) on 8 devices is 2 x 4."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model < 1 or n % model:
        raise ValueError(f"model={model} must be a positive divisor of the {n} devices; pick model from "
                         f"{[d for d in range(1, n + 1) if n % d == 0]}")
    if data == -1:
        data = n // model
    if data < 1 or data * model != n:
        raise ValueError(f"data={data} x model={model} must equal the {n} devices; pass data=-1 to use them all")
    return Mesh(np.array(devices).reshape(data, model), AXES)


def device_mesh(count: int | None = None, model: int = 1, devices=None) -> Mesh | None:
    """The mesh a run uses: the first `count` of `devices` (default jax.devices(); None: all of them), `model`
    of them along "model" and the rest along "data" (make_mesh); None when that is a single device: no mesh,
    the plain one-device code."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices) if count is None else count
    if not 1 <= count <= len(devices):
        raise ValueError(f"{count} devices asked for, {len(devices)} visible: ask for 1 to {len(devices)}")
    mesh = make_mesh(model=model, devices=devices[:count])  # checks `model` on one device too
    return None if count == 1 else mesh


def check_mesh(mesh) -> None:
    """Raises unless `mesh` is None or a mesh with this module's axes (make_mesh's)."""
    if mesh is not None and not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (csm_jax.sharding.make_mesh()), got {type(mesh).__name__}")
    if mesh is not None and tuple(mesh.axis_names) != AXES:
        raise ValueError(f"the mesh's axes are {tuple(mesh.axis_names)}; make it with csm_jax.sharding.make_mesh "
                         f"(axes {AXES})")


def data_size(mesh: Mesh | None) -> int:
    """Devices along the mesh's "data" axis (1 without a mesh): slot, stream and example counts are multiples."""
    return 1 if mesh is None else mesh.shape["data"]


def round_up(n: int, mesh: Mesh | None) -> int:
    """`n` rounded up to a multiple of the "data" size (each device gets as many)."""
    return -(-n // data_size(mesh)) * data_size(mesh)


def check_split(n: int, mesh: Mesh | None, unit: str = "slots") -> None:
    """Raises unless `n` slots (streams, examples: `unit`) split evenly over the mesh's "data" devices."""
    if n % data_size(mesh):
        d = data_size(mesh)
        raise ValueError(f"{n} {unit} cannot be split over the mesh's {d} \"data\" devices; use a multiple of {d} "
                         f"{unit} (e.g. {round_up(n, mesh)})")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------------ logical -> mesh


def logical_to_spec(axes: tuple[str | None, ...], shape, mesh: Mesh, rules=None) -> PartitionSpec:
    """Logical axes (None: never split) -> PartitionSpec through `rules` (default RULES; flax's mapping). A
    dimension that its mesh axis's size does not divide stays whole (replicated) rather than being split
    unevenly, except the slot axis "batch", which must divide: a state that silently stayed whole would not be
    spread. Trailing Nones are dropped (see the module docstring)."""
    rules = RULES if rules is None else rules
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
    known = {name for name, _ in rules}
    for name in axes:
        if name is not None and name not in known:
            raise ValueError(f"no sharding rule for logical axis {name!r}; add it to sharding.RULES")
    spec = list(nn.logical_to_mesh_axes(axes, rules))
    for i, (name, dim) in enumerate(zip(axes, shape)):
        if spec[i] is None:
            continue
        if name == "batch" and spec[i] == "data":
            check_split(dim, mesh)
        if dim % mesh.shape[spec[i]]:
            spec[i] = None
    return _trimmed(spec)


def _trimmed(parts) -> PartitionSpec:
    parts = list(parts)
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)


def specs(shardings):
    """The PartitionSpecs of a pytree of NamedShardings (for jax.shard_map's in_specs and out_specs)."""
    return jax.tree.map(lambda s: s.spec, shardings, is_leaf=lambda s: isinstance(s, NamedSharding))


# ------------------------------------------------------------------------------------ what goes on a mesh


def _param_axes(path, leaf) -> tuple[str, ...]:
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if not names or names[-1] not in PARAM_AXES:
        raise ValueError(f"parameter {jax.tree_util.keystr(path)} has no logical axes; add it to "
                         f"sharding.PARAM_AXES")
    axes = PARAM_AXES[names[-1]]
    last = path[-1]
    # An int8 weight (csm_jax.quantize.Int8Weight): q (out, in) like the weight, scale (out,) like its rows.
    if isinstance(last, jax.tree_util.GetAttrKey) and last.name == "scale":
        return axes[:1]
    return axes


def param_shardings(params, mesh: Mesh, rules=None):
    """The NamedSharding of every leaf of a CSM params pytree (csm.param_shapes' tree, int8 weights too)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, logical_to_spec(_param_axes(p, x), x.shape, mesh, rules)), params)


def shard_params(params, mesh: Mesh, rules=None):
    """Places the parameters on the mesh (replicated or split as `rules` say)."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def _state_axes(path) -> tuple[str, ...]:
    names = [k.name if isinstance(k, jax.tree_util.GetAttrKey) else k.key for k in path
             if isinstance(k, (jax.tree_util.GetAttrKey, jax.tree_util.DictKey))]
    if names[:1] == ["cache"] and names[-1] == "pos":
        return STATE_AXES["cache_pos"]
    return STATE_AXES[names[-1]]


def state_shardings(state: GenState, mesh: Mesh, rules=None):
    """The NamedSharding of every field of a csm.GenState (arrays, tracers or ShapeDtypeStructs): slots split
    along "data" (PRNG keys included)."""
    if not isinstance(state, GenState):
        raise TypeError(f"state_shardings takes a csm.GenState, got {type(state).__name__}")
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, logical_to_spec(_state_axes(p), x.shape, mesh, rules)), state)


def shard_state(state: GenState, mesh: Mesh, rules=None) -> GenState:
    """Places a generation state on the mesh, its slots split along "data" (the slot count must be a
    multiple of the "data" size)."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


def stream_shardings(state, mesh: Mesh, rules=None):
    """The NamedSharding of every leaf of a streaming Mimi state (mimi.init_decoder_state): streams split along
    "data" like the generation slots they decode."""
    return jax.tree.map(lambda x: NamedSharding(mesh, logical_to_spec(
        STREAM_AXES + (None,) * (x.ndim - len(STREAM_AXES)), x.shape, mesh, rules)), state)


def slot_spec(slots: int, mesh: Mesh) -> PartitionSpec:
    """The spec of any array of `slots` slots, slots first and the rest whole (prompts, seeds, a program's
    per-slot results): split along "data" as STATE_AXES's "batch"; also a pytree prefix for jax.shard_map."""
    return logical_to_spec(("batch",), (slots,), mesh)


def shard_batch(x, mesh: Mesh):
    """Places a per-slot input (batch axis first: prompt tokens, masks, lengths, seeds) along "data"."""
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    return jax.device_put(x, NamedSharding(mesh, slot_spec(x.shape[0], mesh)))


def batch_shardings(batch: dict, mesh: Mesh, rules=None) -> dict:
    """The NamedSharding of every array of a training batch (csm_jax.train.data.collate): examples along
    "data" (the batch size must be a multiple of the "data" size), depth-decoder frames along "data"."""
    unknown = set(batch) - set(BATCH_AXES)
    if unknown:
        raise ValueError(f"batch entries {sorted(unknown)} have no logical axes; add them to sharding.BATCH_AXES")
    return {k: NamedSharding(mesh, logical_to_spec(BATCH_AXES[k], np.shape(v), mesh, rules))
            for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------- training
# FSDP on top of the rules, for training (see the comment above BATCH_AXES).


def fsdp_spec(spec: PartitionSpec, shape, mesh: Mesh, axis: str = "data") -> PartitionSpec:
    """`spec` with the largest still-unsplit dimension that mesh[axis] divides split along `axis`
    (matrices only; a vector, a size-1 axis, or no dividing dimension: `spec` unchanged)."""
    n = mesh.shape[axis]
    parts = list(spec) + [None] * (len(shape) - len(spec))
    if n == 1 or len(shape) < 2 or axis in parts:
        return spec
    free = [i for i, (p, d) in enumerate(zip(parts, shape)) if p is None and d % n == 0]
    if not free:
        return spec
    parts[max(free, key=lambda i: (shape[i], -i))] = axis
    return _trimmed(parts)


def train_param_shardings(params, mesh: Mesh, fsdp: bool = False, rules=None):
    """The NamedSharding of every leaf of a parameter pytree for training (CSM parameters or LoRA
    adapters): placed by the rules (tensor parallelism along "model"), plus FSDP along "data" if asked."""
    def one(path, x):
        spec = logical_to_spec(_param_axes(path, x), x.shape, mesh, rules)
        return NamedSharding(mesh, fsdp_spec(spec, x.shape, mesh) if fsdp else spec)
    return jax.tree_util.tree_map_with_path(one, params)


@jax.jit
def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def put(tree, shardings, fresh: bool = False):
    """Places host or single-device arrays onto `shardings` (a matching pytree). In a multi-process run
    each process gives the same whole values and contributes the shards of its own devices. `fresh`: in
    new buffers (device_put may let a device's shard alias the source array, even with may_alias=False,
    and a training step that donates the placed arrays would then delete the caller's)."""
    if jax.process_count() == 1:
        out = jax.device_put(tree, shardings)
    else:
        def one(x, s):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
        out = jax.tree.map(one, tree, shardings)
    return _copy(out) if fresh else out
