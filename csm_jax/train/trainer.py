"""The training step and loop: optax AdamW with warmup + cosine decay, global-norm clipping, gradient
accumulation; full fine-tuning, LoRA, or a frozen backbone; orbax checkpoints; JSON-lines metrics.

Parameters stay fp32 masters (and so does the optimizer state); the transformers compute in
`compute_dtype`: fp32 on CPU, bf16 on GPU/TPU ("auto"). The step is one jitted pure function
(trainable, opt_state, frozen, batch) -> (trainable, opt_state, metrics), donating what it rewrites.
What is trainable: every parameter (full), all but the backbone side (frozen backbone: the backbone
transformer, the text and audio embeddings and the codebook-0 head stay), or only LoRA adapters.

On several devices the step runs on a ("data", "model") mesh of csm_jax.sharding: each batch is split along
"data" (data parallelism), parameters are placed by sharding's rules (tensor parallelism along "model"),
and with FSDP every matrix is also split along "data"; the optimizer state is placed like the parameters it
belongs to (optax.tree_map_params), and the step's outputs keep those placements (out_shardings), so one
compiled program serves every step. On one device nothing is placed: the step is the plain jitted function.

Several hosts (one process each, `start_distributed` first): the mesh spans every process's devices, every
process reads the same batches (same seed) and places only its own devices' shards of them (sharding.put), the
gradients are summed across processes by XLA's collectives, only process 0 writes metrics and progress, and
orbax writes each checkpoint together from all processes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from csm_jax import sharding
from csm_jax.csm import CsmConfig, init_params
from csm_jax.train import data as D
from csm_jax.train.checkpoint import Checkpoints
from csm_jax.train.lora import TARGETS, check_targets, init_lora, merge
from csm_jax.train.loss import csm_loss

BACKBONE_SIDE = ("backbone", "text_embed", "audio_embed", "c0_head")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000  # optimizer updates
    batch_size: int = 4
    accumulate: int = 1  # micro-batches per update (their gradients averaged)
    learning_rate: float = 2e-5
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.01  # on matrices only, not norms
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    depth_ratio: float = 1 / 16  # compute amortization: part of the frames the depth decoder trains on
    context_loss: bool = True  # context turns' audio is a target too (as transformers' processor labels it)
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = TARGETS
    freeze_backbone: bool = False
    compute_dtype: str = "auto"  # auto | float32 | bfloat16
    remat: bool = False  # recompute layer activations in the backward pass (long sequences at full size)
    seed: int = 0

    def check(self) -> "TrainConfig":
        if self.steps < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("steps, batch_size and accumulate must be at least 1")
        if not 0 < self.depth_ratio <= 1:
            raise ValueError(f"depth_ratio must lie in (0, 1], got {self.depth_ratio}")
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = full fine-tuning), got {self.lora_rank}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be auto, float32 or bfloat16, got {self.compute_dtype!r}")
        if self.lora_rank:
            check_targets(self.lora_targets)
        return self

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 1.0

    def dtype(self):
        if self.compute_dtype == "auto":
            return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
        return jnp.dtype(self.compute_dtype)


def schedule(tc: TrainConfig):
    warmup = min(tc.warmup_steps, tc.steps - 1)
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(warmup, 0), max(tc.steps, warmup + 1),
                                              tc.learning_rate * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    decay = lambda tree: jax.tree.map(lambda a: a.ndim >= 2, tree)  # noqa: E731
    opt = optax.chain(optax.clip_by_global_norm(tc.clip_norm),
                      optax.adamw(schedule(tc), tc.b1, tc.b2, weight_decay=tc.weight_decay, mask=decay))
    return optax.MultiSteps(opt, tc.accumulate) if tc.accumulate > 1 else opt


def split_params(cfg: CsmConfig, params: dict, tc: TrainConfig, key=None) -> tuple[dict, dict]:
    """-> (trainable, frozen). LoRA: trainable is the adapters, frozen all of `params`."""
    if tc.lora_rank:
        parts = ("decoder",) if tc.freeze_backbone else ("backbone", "decoder")
        key = key if key is not None else jax.random.key(tc.seed)
        return init_lora(cfg, key, tc.lora_rank, tc.lora_targets, parts=parts), params
    frozen_keys = BACKBONE_SIDE if tc.freeze_backbone else ()
    return ({k: v for k, v in params.items() if k not in frozen_keys},
            {k: v for k, v in params.items() if k in frozen_keys})


def joined(cfg: CsmConfig, trainable: dict, frozen: dict, tc: TrainConfig, merged: bool = False):
    """-> (params, lora or None); `merged` folds LoRA into the parameters (for export and generation)."""
    if tc.lora_rank:
        return (merge(cfg, frozen, trainable, tc.lora_scale), None) if merged else (frozen, trainable)
    return {**frozen, **trainable}, None


def _loss(cfg, tc, trainable, frozen, batch):
    params, lora = joined(cfg, trainable, frozen, tc)
    return csm_loss(params, cfg, batch, lora, tc.lora_scale, tc.dtype(), tc.remat)


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def start_distributed() -> bool:
    """Joins a multi-host run when the environment describes one (csm_jax.distributed: JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a launcher JAX detects); returns whether it did. Call before anything
    touches a device. Training needs cross-process collectives: on CPU they go through gloo (the setting only
    concerns JAX's CPU backend)."""
    from csm_jax import distributed

    if distributed.plan() is None:
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    return distributed.initialize()


def host_values(tree):
    """The whole values of a (possibly sharded across processes) pytree as numpy arrays, in every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def training_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh | None:
    """The mesh training runs on: `data` x `model` of `devices` (default jax.devices(); the first
    data*model of them). data=None takes every device left after `model`. None (no mesh: plain one-device
    training) when that is a single device."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or (data is not None and data < 1):
        raise ValueError(f"--mesh-data ({data}) and --mesh-model ({model}) must be at least 1")
    if data is None:
        if len(devices) % model:
            raise ValueError(f"--mesh-model {model} must divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model > len(devices):
        raise ValueError(f"a {data} x {model} mesh needs {data * model} devices, only {len(devices)} are visible; "
                         f"lower --mesh-data/--mesh-model")
    if jax.process_count() > 1 and data * model != len(devices):
        raise ValueError(f"a multi-host run trains on all {len(devices)} devices of its {jax.process_count()} "
                         f"processes; --mesh-data x --mesh-model ({data} x {model}) must equal {len(devices)}")
    if data * model == 1:
        return None
    return sharding.make_mesh(data, model, devices[:data * model])


@dataclass(frozen=True)
class Placement:
    """Where the training state lives on a mesh: NamedSharding pytrees of the trainable parameters, the
    optimizer state (each param-shaped part like its parameters, counters replicated) and the frozen ones."""
    mesh: Mesh
    trainable: object
    opt_state: object
    frozen: object

    def abstract(self, trainable, opt_state):
        """ShapeDtypeStructs of (trainable, opt_state) carrying these shardings (orbax restore targets)."""
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        return jax.tree.map(sds, trainable, self.trainable), jax.tree.map(sds, opt_state, self.opt_state)


def abstract_state(cfg: CsmConfig, tc: TrainConfig):
    """Shapes of (trainable, opt_state, frozen) for (cfg, tc), computed without allocating."""
    def build():
        trainable, frozen = split_params(cfg, init_params(cfg, jax.random.key(0)), tc)
        return trainable, make_optimizer(tc).init(trainable), frozen
    return jax.eval_shape(build)


@lru_cache(maxsize=8)
def placement(cfg: CsmConfig, tc: TrainConfig, mesh: Mesh, fsdp: bool = False) -> Placement:
    trainable, opt_state, frozen = abstract_state(cfg, tc)
    t_sh = sharding.train_param_shardings(trainable, mesh, fsdp)
    replicated = NamedSharding(mesh, PartitionSpec())
    o_sh = optax.tree_map_params(make_optimizer(tc), lambda _, s: s, opt_state, t_sh,
                                 transform_non_params=lambda _: replicated)
    return Placement(mesh, t_sh, o_sh, sharding.train_param_shardings(frozen, mesh, fsdp))


def place_state(cfg: CsmConfig, tc: TrainConfig, trainable, frozen, mesh: Mesh | None, fsdp: bool = False):
    """-> (trainable, opt_state, frozen) on the mesh (or as they are with no mesh), opt_state freshly made."""
    optimizer = make_optimizer(tc)
    if mesh is None:
        return trainable, optimizer.init(trainable), frozen
    pl = placement(cfg, tc, mesh, fsdp)
    trainable, frozen = sharding.put(trainable, pl.trainable, fresh=True), sharding.put(frozen, pl.frozen)
    return trainable, jax.jit(optimizer.init, out_shardings=pl.opt_state)(trainable), frozen


def restore_target(cfg: CsmConfig, tc: TrainConfig, trainable, mesh: Mesh | None, fsdp: bool = False) -> dict:
    """{"trainable", "opt_state"} as ShapeDtypeStructs placed for `mesh` (None: the first device): what
    Checkpoints.restore reads a checkpoint into, whatever mesh wrote it."""
    abstract = jax.eval_shape(lambda t: (t, make_optimizer(tc).init(t)), trainable)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)
    else:
        like = placement(cfg, tc, mesh, fsdp).abstract(*abstract)
    return {"trainable": like[0], "opt_state": like[1]}


def place_batch(batch: dict, mesh: Mesh | None) -> dict:
    """A collated batch onto the mesh: examples (and depth-decoder frames) split along "data"."""
    return batch if mesh is None else sharding.put(batch, sharding.batch_shardings(batch, mesh))


def check_batch(tc: TrainConfig, mesh: Mesh | None) -> None:
    n = 1 if mesh is None else mesh.shape["data"]
    if tc.batch_size % n:
        raise ValueError(f"--batch-size {tc.batch_size} cannot be split over {n} data-parallel devices; use a "
                         f"multiple of {n}, or fewer devices with --mesh-data")


@lru_cache(maxsize=8)
def make_step(cfg: CsmConfig, tc: TrainConfig, mesh: Mesh | None = None, fsdp: bool = False):
    """The jitted step for (cfg, tc) [on `mesh`], made once per key (a resumed run in the same process
    compiles nothing). On a mesh its outputs keep the placement's shardings (the inputs must have them:
    place_state, place_batch)."""
    optimizer = make_optimizer(tc)

    def step(trainable, opt_state, frozen, batch):
        (_, aux), grads = jax.value_and_grad(partial(_loss, cfg, tc), has_aux=True)(trainable, frozen, batch)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, dict(aux, grad_norm=global_norm(grads))
    if mesh is None:
        return jax.jit(step, donate_argnums=(0, 1))
    pl = placement(cfg, tc, mesh, fsdp)
    return jax.jit(step, donate_argnums=(0, 1),
                   out_shardings=(pl.trainable, pl.opt_state, NamedSharding(mesh, PartitionSpec())))


@lru_cache(maxsize=8)
def make_eval(cfg: CsmConfig, tc: TrainConfig, mesh: Mesh | None = None):
    fn = lambda trainable, frozen, batch: _loss(cfg, tc, trainable, frozen, batch)[1]  # noqa: E731
    return jax.jit(fn) if mesh is None else jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def eval_loss(eval_fn, trainable, frozen, batches) -> dict:
    """Token-weighted mean of the backbone and depth losses over held-out batches."""
    tot = {"backbone": 0.0, "depth": 0.0, "nb": 0, "nd": 0}
    for batch in batches:
        m = jax.device_get(eval_fn(trainable, frozen, batch))
        tot["backbone"] += float(m["backbone_loss"]) * int(m["backbone_tokens"])
        tot["depth"] += float(m["depth_loss"]) * int(m["depth_tokens"])
        tot["nb"] += int(m["backbone_tokens"])
        tot["nd"] += int(m["depth_tokens"])
    b, d = tot["backbone"] / max(tot["nb"], 1), tot["depth"] / max(tot["nd"], 1)
    return {"eval_loss": b + d, "eval_backbone_loss": b, "eval_depth_loss": d}


@dataclass
class RunOptions:
    out_dir: Path
    checkpoint_every: int = 100  # optimizer steps; 0: only at the end
    keep: int = 3
    eval_every: int = 100  # optimizer steps; 0: only at the end
    resume: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop (checkpointed) after this many optimizer steps of this run
    mesh_data: int | None = None  # data-parallel devices (None: all devices left after mesh_model)
    mesh_model: int = 1  # tensor-parallel devices
    fsdp: bool = False  # also split parameters and optimizer state along "data"
    base: str = ""  # recorded in checkpoints: the frozen parameters' source
    extra: dict = field(default_factory=dict)


def _jsonable(tc: TrainConfig) -> dict:
    d = asdict(tc)
    d["lora_targets"] = list(d["lora_targets"])
    return d


def fit(cfg: CsmConfig, params: dict, train_rows: list, eval_rows: list, tc: TrainConfig, run: RunOptions,
        log=print) -> tuple[dict, dict, list[dict]]:
    """Trains; -> (trainable, frozen, metrics lines). Writes run.out_dir/metrics.jsonl and checkpoints/."""
    tc = tc.check()
    mesh = training_mesh(run.mesh_data, run.mesh_model)
    check_batch(tc, mesh)
    primary = jax.process_index() == 0  # the process that writes metrics and shows progress
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    turns = max(D.max_turns(train_rows), D.max_turns(eval_rows) if eval_rows else 1)
    batches = D.Batches(train_rows, tc.batch_size, tc.depth_ratio, tc.seed, turns)
    ckpt = Checkpoints(out / "checkpoints", run.keep)
    step, epoch, index = 0, 0, 0
    metrics_path = out / "metrics.jsonl"
    if run.resume and ckpt.latest() is not None:
        trainable, frozen = split_params(cfg, params, tc)
        if mesh is not None:
            frozen = sharding.put(frozen, placement(cfg, tc, mesh, run.fsdp).frozen)
        (state, record) = ckpt.restore(ckpt.latest(), restore_target(cfg, tc, trainable, mesh, run.fsdp))
        trainable, opt_state = state["trainable"], state["opt_state"]
        if record["train_config"] != _jsonable(tc):
            raise ValueError(f"--resume: the checkpoint in {ckpt.dir} was made with other training settings; "
                             "use the same settings, or a new output folder")
        step, epoch, index = record["step"], record["epoch"], record["index"]
        log(f"resumed at step {step} (epoch {epoch}, batch {index}) from {ckpt.dir}")
        lines = [json.loads(x) for x in metrics_path.read_text().splitlines()] if metrics_path.exists() else []
        lines = [m for m in lines if m["step"] <= step]  # what came after the checkpoint is done again
        if primary:
            metrics_path.write_text("".join(json.dumps(m) + "\n" for m in lines))
    elif ckpt.latest() is not None and not run.resume:
        ckpt.close()
        raise ValueError(f"{ckpt.dir} already holds checkpoints: pass --resume to continue, or another output folder")
    else:
        if run.resume:
            log(f"--resume: no checkpoint in {ckpt.dir} yet, starting from the beginning")
        elif metrics_path.exists() and primary:
            metrics_path.unlink()
        trainable, opt_state, frozen = place_state(cfg, tc, *split_params(cfg, params, tc), mesh, run.fsdp)
    if mesh is not None:
        log(f"training on a {mesh.shape['data']} (data) x {mesh.shape['model']} (model) mesh"
            f"{', parameters and optimizer state split along data (FSDP)' if run.fsdp else ''}")

    train_step, eval_fn = make_step(cfg, tc, mesh, run.fsdp), make_eval(cfg, tc, mesh)
    eval_sets = [place_batch(b, mesh) for b in D.eval_batches(eval_rows, tc.batch_size, turns)] if eval_rows else []
    lr = schedule(tc)
    data = batches.iterate(epoch, index)
    history: list[dict] = []
    stop = tc.steps if run.stop_after is None else min(tc.steps, step + run.stop_after)
    bar = None
    if run.progress and primary:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=step, unit="step", dynamic_ncols=True)

    def record(next_pos):
        return {"step": step, "epoch": next_pos[0], "index": next_pos[1], "seed": tc.seed,
                "train_config": _jsonable(tc), "base": run.base,
                "mesh": dict(mesh.shape) if mesh is not None else {"data": 1, "model": 1}, "fsdp": run.fsdp,
                **run.extra}

    def write(line):
        history.append(line)
        if primary:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(line) + "\n")

    t_run, frames_run = time.perf_counter(), 0
    while step < stop:
        t0 = time.perf_counter()
        sums, frames, rows = {}, 0, 0
        for _ in range(tc.accumulate):
            epoch, index, batch = next(data)
            frames += int((batch["labels"][..., 0] != D.IGNORE).sum())
            rows += int(batch["mask"].any(-1).sum())
            trainable, opt_state, m = train_step(trainable, opt_state, frozen, place_batch(batch, mesh))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
        m = {k: float(v) / tc.accumulate for k, v in jax.device_get(sums).items()}
        step += 1
        dt = time.perf_counter() - t0
        frames_run += frames
        line = {"step": step, "epoch": epoch, "loss": m["loss"], "backbone_loss": m["backbone_loss"],
                "depth_loss": m["depth_loss"], "grad_norm": m["grad_norm"], "lr": float(lr(step - 1)),
                "frames": frames, "frames_per_s": frames / dt, "tokens_per_s": rows / dt, "step_s": dt,
                "elapsed_s": time.perf_counter() - t_run}
        if run.eval_every and eval_sets and (step % run.eval_every == 0 or step == tc.steps):
            line.update(eval_loss(eval_fn, trainable, frozen, eval_sets))
        write(line)
        if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.3f}", fps=f"{frames / dt:.0f}", **(
                {"eval": f"{line['eval_loss']:.3f}"} if "eval_loss" in line else {}))
            bar.update(1)
        if (run.checkpoint_every and step % run.checkpoint_every == 0) or step == stop:
            ckpt.save(step, {"trainable": trainable, "opt_state": opt_state}, record((epoch, index + 1)))
    if bar is not None:
        bar.close()
    ckpt.close()
    if primary:
        (out / "train_config.json").write_text(json.dumps(_jsonable(tc), indent=2))
    return trainable, frozen, history

