"""Training checkpoints with orbax-checkpoint: trainable parameters (all of them, or the LoRA adapters),
optimizer state, and a JSON record of the data position (epoch, batch index), step and seeds.

Saves are asynchronous (the step loop goes on while the arrays are written) and atomic (a step's folder
appears only once complete); the last `keep` steps are kept. Sharded arrays are saved as they lie (each
device writes its shards) and restored onto the shardings the caller asks for. Frozen parameters are not saved: they are the
base checkpoint's, which the record names.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax


class Checkpoints:
    def __init__(self, directory: str | os.PathLike, keep: int = 3, asynchronous: bool = True):
        import orbax.checkpoint as ocp

        if keep < 1:
            raise ValueError(f"keep must be at least 1 checkpoint, got {keep}")
        self.dir = Path(directory).absolute()
        self._ocp = ocp
        self.mgr = ocp.CheckpointManager(
            self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=asynchronous))

    def latest(self) -> int | None:
        return self.mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def save(self, step: int, state, record: dict) -> None:
        """state: a pytree of arrays (trainable parameters, optimizer state); record: JSON-able."""
        a = self._ocp.args
        self.mgr.save(step, args=a.Composite(state=a.StandardSave(state), record=a.JsonSave(record)), force=True)

    def restore(self, step: int, like) -> tuple[object, dict]:
        """-> (state shaped and placed like `like`, record). `like`'s leaves are arrays or
        jax.ShapeDtypeStructs with a sharding: each array is read straight into those shards (the current
        mesh's), whatever devices wrote it: a checkpoint saved on 8 devices restores on 2 or on 1."""
        a = self._ocp.args
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        out = self.mgr.restore(step, args=a.Composite(state=a.StandardRestore(abstract), record=a.JsonRestore()))
        return out.state, out.record

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()
