"""The engine's device programs and the shapes it runs them at: one table that admission, generation and
warm-up share, so warm-up compiles exactly what serving runs.

  generate   F = frames_per_call frames for the generating slots and their streaming Mimi decode, in one
             program (`generate_audio`); its rows are the generating slots padded with other (finished, so
             unchanged) slots to the next of ROW_BUCKETS, or every slot (`rows`). On a mesh always every slot.
  prefill    prompt rows into a group of GROUP_COUNTS (64, 8 or 1) slots at once, in pieces of
             `csm.piece_sizes()` rows (`csm.prefill_pieces`). A step prefills as many groups as admission
             chose: n requests of one length class go in as n // 64 groups of 64, then groups of 8, then
             single ones, so no group is padded with idle slots.
  reset, start, mimi_reset, stop, rewind
             per-slot updates of the generation state (start: sampling settings) and of the Mimi decoder state
             (mimi_reset: the started slots' streams afresh, by a mask over every slot), their slot ids padded
             to every slot by repeating the first (which writes the same values again): one program each,
             whatever the count.

Few programs, so a server starts quickly (benchmarks/bench_startup.py counts and compiles them): at 1,024
slots 5 generation programs (1, 8, 64, 256, 1,024 rows), 3 x 4 prefill programs and 5 updates; powers of two
compiled 11 generation programs and 4 x 4 prefill programs plus 4 x 4 updates. The price is padding: a step
of 65 generating slots computes 256 rows. On an accelerator a step reads every weight whatever its rows, so up
to ~128 rows cost about the same (an H100 ran 16 rows at 10.7 ms a frame, 64 at 12.0, 256 at 18.4: README of
the GPU figures in benchmarks/README.md); the padding costs at most about 1.5x a step's time just above a
bucket, and the steps stay far faster than real time. Padding never changes a slot's codes: every row
computes its own slot.

Warm-up (`compile`) compiles every program of the table ahead of time, several at once on the host's cores
(XLA compiles outside Python's lock); the jitted functions then find them in JAX's cache, so serving compiles
nothing. Each compiled program's memory analysis (`memory`) says what it needs beside the state it updates in
place.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from csm_jax import csm, sharding
from csm_jax.audio import pcm16
from csm_jax.bundle import ModelBundle
from csm_jax.mimi import decode_step, init_decoder_state

ROW_BUCKETS = (1, 8, 64, 256)  # rows of a generation program below every slot
GROUP_COUNTS = (64, 8, 1)  # requests one prefill program takes, largest first


@partial(jax.jit, static_argnums=(1, 6, 7), donate_argnums=(3, 4))
def generate_audio(params, cfg: csm.CsmConfig, mimi, state: csm.GenState, mimi_state, slot_ids, num_frames: int,
                   mesh: Mesh | None = None):
    """`num_frames` frames for the slots `slot_ids` (R,) int (None: all) and their streaming Mimi decode, in one
    program. -> (state, mimi_state, (pcm (R, F * 1920) float32, pcm16 (R, F * 1920) int16, codes (R, F, C) int32,
    valid (R, F), done (R,))); pcm16 is pcm as 16-bit PCM (audio.pcm16), converted here so that the host only
    copies the bytes a server sends. Invalid frames (a finished slot) leave the Mimi state as it was; their PCM is
    meaningless.
    With a `mesh` (slot_ids None; states split along "data"), each device runs its own slots: the program is
    mapped over "data" (jax.shard_map), so no slot's data moves between devices; "model" stays automatic."""
    if mesh is not None:
        if slot_ids is not None:
            raise ValueError("on a mesh, generate_audio runs every slot (slot_ids=None)")
        # Placed as csm_jax.sharding describes them: the states (and the per-slot results) split along "data".
        gen_spec = sharding.specs(sharding.state_shardings(state, mesh))
        mimi_spec = sharding.specs(sharding.stream_shardings(mimi_state, mesh))
        local = jax.shard_map(partial(_generate_audio, cfg=cfg, slot_ids=None, num_frames=num_frames), mesh=mesh,
                              in_specs=(PartitionSpec(), PartitionSpec(), gen_spec, mimi_spec),
                              out_specs=(gen_spec, mimi_spec, sharding.slot_spec(state.done.shape[0], mesh)),
                              axis_names={"data"}, check_vma=False)
        return local(params, mimi, state, mimi_state)
    return _generate_audio(params, mimi, state, mimi_state, cfg=cfg, slot_ids=slot_ids, num_frames=num_frames)


def _generate_audio(params, mimi, state: csm.GenState, mimi_state, *, cfg: csm.CsmConfig, slot_ids,
                    num_frames: int):
    state, codes, valid = csm.run_frames(params, cfg, state, num_frames, slot_ids)
    sub = mimi_state if slot_ids is None else jax.tree.map(lambda a: a[slot_ids], mimi_state)
    # A scan, not an unrolled loop: the Mimi decoder is compiled once per program, whatever num_frames is.
    sub, pcm = jax.lax.scan(lambda st, cv: decode_step(mimi, st, cv[0], active=cv[1]), sub,
                            (jnp.moveaxis(codes, 1, 0), valid.T))  # pcm (F, R, 1920)
    mimi_state = sub if slot_ids is None else jax.tree.map(lambda a, b: a.at[slot_ids].set(b), mimi_state, sub)
    done = state.done if slot_ids is None else state.done[slot_ids]
    pcm = jnp.moveaxis(pcm, 0, 1).reshape(pcm.shape[1], -1)
    return state, mimi_state, (pcm, pcm16(pcm), codes, valid, done)


def bucket_rows(active: int, slots: int) -> int:
    """Rows one generation program computes for `active` generating slots of `slots` on one device: the next of
    ROW_BUCKETS below every slot, else every slot."""
    return next((r for r in ROW_BUCKETS if r >= active and r < slots), slots)


def group_counts(slots: int) -> tuple[int, ...]:
    """The GROUP_COUNTS an engine of `slots` slots prefills in (none larger than its slots)."""
    return tuple(c for c in GROUP_COUNTS if c <= slots)


def split_counts(n: int, counts: tuple[int, ...]) -> list[int]:
    """`n` requests as groups of `counts` (largest first, the last 1): as many of the largest as fit, then of
    the next, ... (64 + 64 + 8 + 1 for 137). No group is padded."""
    out = []
    for c in counts:
        out += [c] * (n // c)
        n %= c
    return out


class Program(NamedTuple):
    """One entry of the table: a jitted function and arguments of the shapes the engine calls it with."""

    what: str
    fn: Callable
    args: tuple


class Programs:
    """The device programs of an engine of `slots` slots, at the shapes `table()` lists."""

    def __init__(self, model: ModelBundle, slots: int, frames_per_call: int):
        self.model, self.slots, self.frames_per_call = model, slots, frames_per_call
        self.counts = group_counts(slots)
        self.mimi_fresh = model.replicate(init_decoder_state(model.mimi, 1))  # what a reset Mimi row becomes

    # ------------------------------------------------------------------------------------------- shapes

    def rows(self, active: int) -> int:
        """Rows one generation program computes for `active` generating slots: the next of ROW_BUCKETS (or
        every slot). On a mesh always every slot, each device running its own (generate_audio's shard_map): a
        subset of rows would be gathered from every device and computed whole on each (benchmarks/README.md,
        "Mesh")."""
        if self.model.mesh is not None:
            return self.slots
        return bucket_rows(active, self.slots)

    def generate_rows(self) -> list[int]:
        return sorted({self.rows(n) for n in (*ROW_BUCKETS, self.slots) if n <= self.slots})

    def table(self, state, mimi_state) -> list[Program]:
        """Every program at every shape the engine runs it, with arguments for `state` and `mimi_state` (the
        engine's; lowering a program reads only their shapes and placements)."""
        m, F = self.model, self.frames_per_call
        table = []
        for R in self.generate_rows():
            ids = None if R >= self.slots else self._put(np.arange(R), np.int32)
            table.append(Program(f"generate {F} frames for {R} slots", generate_audio,
                                 (m.params, m.cfg, m.mimi, state, mimi_state, ids, F, m.mesh)))
        for C in self.counts:
            ids = self._put(np.arange(C), np.int32)
            for P in csm.piece_sizes():
                z = np.zeros((C, P, 33))
                table.append(Program(f"prefill {C} x {P} rows", csm.prefill,
                                     (m.params, m.cfg, state, self._put(z, np.int32), self._put(z, bool),
                                      self._put(z[:, 0, 0], np.int32), ids)))
        ids, zeros = self._pad([0]), self._put(np.zeros(self.slots), np.int32)
        table += [Program("reset slots", csm.reset_slots, (state, ids)),
                  Program("start slots", csm.set_sampling, (state, ids, self._put(np.zeros(self.slots), np.float32),
                                                           zeros, self._put(np.zeros(self.slots), np.uint32), zeros)),
                  Program("reset Mimi streams", m.mimi_reset_program(mimi_state),
                          (mimi_state, self._put(np.zeros(self.slots), bool), self.mimi_fresh)),
                  Program("stop slots", csm.stop_slots, (state, ids)),
                  Program("rewind slots", csm.rewind_slots, (state, ids, zeros))]
        return table

    def compile(self, state, mimi_state, progress: Callable[[int, int, str], None] | None = None,
                workers: int | None = None) -> list[tuple[Program, jax.stages.Compiled]]:
        """Compiles every program of the table ahead of time, `workers` at once (default: one per core of the
        host), without running any; uses JAX's on-disk compile cache when enabled. `progress(compiled, total,
        what)` after each. Returns each program with its compiled form (for its memory analysis)."""
        table = self.table(state, mimi_state)
        workers = max(1, min(len(table), workers or os.cpu_count() or 1))
        compiled = {}
        with ThreadPoolExecutor(workers, thread_name_prefix="csm-compile") as pool:
            running = {pool.submit(lambda p: p.fn.lower(*p.args).compile(), p): i for i, p in enumerate(table)}
            for future in as_completed(running):  # progress told from the caller's thread
                i = running[future]
                try:
                    compiled[i] = future.result()
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)  # those not started never start
                    raise
                if progress is not None:
                    progress(len(compiled), len(table), table[i].what)
        return [(p, compiled[i]) for i, p in enumerate(table)]

    # ----------------------------------------------------------------------------------------- programs

    def generate(self, state, mimi_state, active: list[int]):
        """F frames for the generating slots `active` -> (state, mimi_state, the program's slot order, its
        outputs (pcm, pcm16, codes, valid, done), rows in that order, on the device)."""
        R = self.rows(len(active))
        if R >= self.slots:
            order, slot_ids = list(range(self.slots)), None
        else:
            busy = set(active)
            order = active + [s for s in range(self.slots) if s not in busy][:R - len(active)]
            slot_ids = self._put(order, np.int32)
        m = self.model
        state, mimi_state, out = generate_audio(m.params, m.cfg, m.mimi, state, mimi_state, slot_ids,
                                                self.frames_per_call, m.mesh)
        return state, mimi_state, order, out

    def prefill(self, state, slot_ids: list[int], tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray):
        """Appends prompt rows to the distinct slots `slot_ids` (n,): tokens and mask (n, S, 33), lengths (n,)
        rows each (the rest is padding); in groups of `counts` slots (`split_counts`)."""
        put = lambda x: self._put(x, x.dtype)  # noqa: E731 - one transfer per piece array (replicated on a mesh)
        start = 0
        for C in split_counts(len(slot_ids), self.counts):
            group = slice(start, start + C)
            ids = self._put(slot_ids[group], np.int32)
            for t, m, ln in csm.prefill_pieces(tokens[group], mask[group], lengths[group], put=put):
                state = csm.prefill(self.model.params, self.model.cfg, state, t, m, ln, ids)
            start += C
        return state

    def reset(self, state, slot_ids: list[int]):
        """The slots become empty: no context, position 0, finished."""
        return csm.reset_slots(state, self._pad(slot_ids))

    def start(self, state, mimi_state, slot_ids: list[int], sampling: list[tuple]):
        """The slots generate from their last row with `sampling` ((temperature, topk, seed, max_frames) each),
        their Mimi streams fresh."""
        cols = list(zip(*sampling))
        pad = lambda v, dtype: self._put(list(v) + [v[0]] * (self.slots - len(v)), dtype)  # noqa: E731
        state = csm.set_sampling(state, self._pad(slot_ids), pad(cols[0], np.float32), pad(cols[1], np.int32),
                                 pad(cols[2], np.uint32), pad(cols[3], np.int32))
        fresh = np.zeros(self.slots, bool)
        fresh[slot_ids] = True
        return state, self.model.reset_mimi_rows(mimi_state, self._put(fresh, bool), self.mimi_fresh)

    def stop(self, state, slot_ids: list[int]):
        return csm.stop_slots(state, self._pad(slot_ids))

    def rewind(self, state, slot_ids: list[int], rows: list[int]):
        """The slots forget their last `rows` rows each."""
        rows = list(rows) + [0] * (self.slots - len(rows))  # the padding repeats the first slot, minus 0 rows
        return csm.rewind_slots(state, self._pad(slot_ids), self._put(rows, np.int32))

    # ---------------------------------------------------------------------------------------- placement

    def _put(self, values, dtype) -> jax.Array:
        """Host values to the device(s) as `dtype` (replicated on a mesh: ModelBundle.put)."""
        return self.model.put(values, dtype)

    def _pad(self, slot_ids: list[int]) -> jax.Array:
        """`slot_ids` padded to every slot by repeating the first (the padding writes the same values again)."""
        if not 1 <= len(slot_ids) <= self.slots:
            raise ValueError(f"{len(slot_ids)} slots updated together; the engine has {self.slots}")
        return self._put(list(slot_ids) + [slot_ids[0]] * (self.slots - len(slot_ids)), np.int32)
