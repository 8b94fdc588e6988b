"""Where training runs: the mesh, the training state and batches placed on it, and the step compiled for that.

On several devices the step runs on a ("data", "model") mesh of csm_jax.sharding: each batch is split along
"data" (data parallelism), parameters are placed by sharding's rules (tensor parallelism along "model"), and with
FSDP every matrix is also split along "data"; the optimizer state is placed like the parameters it belongs to
(optax.tree_map_params), and the step's outputs keep those placements, so one compiled program serves every
step. On one device nothing is placed: the step is the plain jitted function.

Several hosts (one process each, joined by csm_jax.distributed.initialize(cross_process_collectives=True) before
anything touches a device): the mesh spans every process's devices, every process reads the same batches (same
seed) and places only its own devices' shards of them (sharding.put), and the gradients are summed across
processes by XLA's collectives.
"""

from __future__ import annotations

from functools import partial

import jax
import optax
from jax.sharding import Mesh

from csm_jax import sharding
from csm_jax.csm import CsmConfig
from csm_jax.train.step import SettingError, TrainConfig, abstract_state, make_optimizer, update
from csm_jax.train.step import loss as step_loss


def training_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh | None:
    """The mesh training runs on: `data` x `model` of `devices` (default jax.devices(); the first data*model of
    them). data=None takes every device left after `model`. None (no mesh: plain one-device training) when that
    is a single device. `data` and `model` are RunOptions' `mesh_data` and `mesh_model`."""
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or (data is not None and data < 1):
        raise SettingError(f"`mesh_data` ({data}) and `mesh_model` ({model}) must be at least 1")
    count = None if data is None else data * model
    if jax.process_count() > 1 and count not in (None, len(devices)):
        raise SettingError(f"a multi-host run trains on all {len(devices)} devices of its {jax.process_count()} "
                           f"processes; `mesh_data` x `mesh_model` ({data} x {model}) must equal {len(devices)}")
    try:
        return sharding.device_mesh(count, model, devices)
    except ValueError as e:
        raise SettingError(f"`mesh_data` x `mesh_model` ({'all' if data is None else data} x {model}): {e}") from None


def check_batch(tc: TrainConfig, mesh: Mesh | None) -> None:
    """Raises unless a batch of `tc.batch_size` examples splits evenly over the mesh's "data" devices."""
    try:
        sharding.check_split(tc.batch_size, mesh, "examples")
    except ValueError as e:
        raise SettingError(f"`batch_size`: {e}, or fewer data-parallel devices (`mesh_data`)") from None


class Placement:
    """Where the training state of (cfg, tc) lives: on `mesh` (FSDP or not), or with no mesh on one device,
    where nothing is placed. `trainable`, `opt_state` and `frozen` are NamedSharding pytrees on a mesh (None
    without). Placements of the same (cfg, tc, mesh, fsdp) are equal: the step compiled for one
    (`train_step`, which takes its placement as a static argument) serves them all."""

    def __init__(self, cfg: CsmConfig, tc: TrainConfig, mesh: Mesh | None = None, fsdp: bool = False):
        self.cfg, self.tc, self.mesh, self.fsdp = cfg, tc, mesh, fsdp and mesh is not None
        self.trainable = self.opt_state = self.frozen = None
        if mesh is not None:
            trainable, opt_state, frozen = abstract_state(cfg, tc)
            self.trainable = sharding.train_param_shardings(trainable, mesh, self.fsdp)
            self.opt_state = optax.tree_map_params(make_optimizer(tc), lambda _, s: s, opt_state, self.trainable,
                                                   transform_non_params=lambda _: sharding.replicated(mesh))
            self.frozen = sharding.train_param_shardings(frozen, mesh, self.fsdp)

    def _key(self):
        return self.cfg, self.tc, self.mesh, self.fsdp

    def __eq__(self, other):
        return isinstance(other, Placement) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def state(self, trainable, frozen):
        """-> (trainable, opt_state, frozen) placed (as they are with no mesh), opt_state freshly made."""
        optimizer = make_optimizer(self.tc)
        if self.mesh is None:
            return trainable, optimizer.init(trainable), frozen
        trainable = sharding.put(trainable, self.trainable, fresh=True)
        return trainable, jax.jit(optimizer.init, out_shardings=self.opt_state)(trainable), self.place_frozen(frozen)

    def place_frozen(self, frozen):
        return frozen if self.mesh is None else sharding.put(frozen, self.frozen)

    def batch(self, batch: dict) -> dict:
        """A collated batch onto the mesh: examples (and depth-decoder frames) split along "data"."""
        return batch if self.mesh is None else sharding.put(batch, sharding.batch_shardings(batch, self.mesh))

    def restore_target(self, trainable) -> dict:
        """{"trainable", "opt_state"} as ShapeDtypeStructs placed here (no mesh: the first device): what
        Checkpoints.restore reads a checkpoint into, whatever mesh wrote it."""
        abstract = jax.eval_shape(lambda t: (t, make_optimizer(self.tc).init(t)), trainable)
        if self.mesh is None:
            one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            placed = jax.tree.map(lambda _: one, abstract)
        else:
            placed = (self.trainable, self.opt_state)
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
        return {"trainable": jax.tree.map(sds, abstract[0], placed[0]),
                "opt_state": jax.tree.map(sds, abstract[1], placed[1])}

    def keep(self, trainable, opt_state, metrics):
        """Inside the step: its results held where the inputs were (metrics replicated), so the next step
        takes them as they come."""
        if self.mesh is None:
            return trainable, opt_state, metrics
        return jax.lax.with_sharding_constraint(
            (trainable, opt_state, metrics), (self.trainable, self.opt_state, sharding.replicated(self.mesh)))


@partial(jax.jit, static_argnums=(0,), donate_argnums=(1, 2))
def train_step(pl: Placement, trainable, opt_state, frozen, batch):
    """step.update on `pl`'s placement, donating what it rewrites: the inputs must be placed by `pl`
    (Placement.state, Placement.batch). -> (trainable, opt_state, metrics)."""
    return pl.keep(*update(pl.cfg, pl.tc, trainable, opt_state, frozen, batch))


@partial(jax.jit, static_argnums=(0,))
def eval_metrics(pl: Placement, trainable, frozen, batch) -> dict:
    """The loss metrics of one held-out batch (replicated on a mesh)."""
    metrics = step_loss(pl.cfg, pl.tc, trainable, frozen, batch)[1]
    return metrics if pl.mesh is None else jax.lax.with_sharding_constraint(metrics, sharding.replicated(pl.mesh))


def host_values(tree):
    """The whole values of a (possibly sharded across processes) pytree as numpy arrays, in every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
