"""The engine's device programs and the shapes it runs them at: one table that admission, generation and
warm-up share, so warm-up compiles exactly what serving runs.

  generate   F = frames_per_call frames for the generating slots and their streaming Mimi decode, in one
             program (`generate_audio`); its rows are the generating slots padded to a power of two with
             other (finished, so unchanged) slots, or every slot (`rows`). On a mesh always every slot.
  prefill    prompt rows into some slots, in pieces of `csm.piece_sizes()` rows (`csm.prefill_pieces`); the
             slots padded to a power of two (`count`) with other, distinct slots given no rows (read and
             written back unchanged).
  reset, start, stop, rewind
             per-slot updates of the generation state (start: sampling settings and a fresh Mimi stream), their
             slots padded to a power of two by repeating the first (which writes the same values again).

At most `max_count` slots are updated together (the requests prefilled together), so `table()` is: generate
at each of `generate_rows()`, prefill at each of `counts()` x piece size, and the updates at each of `counts()`.
Every device call of the engine goes through this class, padded by `rows` and `count`, the same functions
`table()` enumerates; a count over `max_count` (a program warm-up never compiled) is refused.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from csm_jax import csm, sharding
from csm_jax.bundle import ModelBundle
from csm_jax.mimi import decode_step, init_decoder_state
from csm_jax.schedule import bucket


@partial(jax.jit, static_argnums=(1, 6, 7), donate_argnums=(3, 4))
def generate_audio(params, cfg: csm.CsmConfig, mimi, state: csm.GenState, mimi_state, slot_ids, num_frames: int,
                   mesh: Mesh | None = None):
    """`num_frames` frames for the slots `slot_ids` (R,) int (None: all) and their streaming Mimi decode, in one
    program. -> (state, mimi_state, (pcm (R, F * 1920) float32, codes (R, F, C) int32, valid (R, F), done (R,))).
    Invalid frames (a finished slot) leave the Mimi state as it was; their PCM is meaningless.
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
    return state, mimi_state, (jnp.moveaxis(pcm, 0, 1).reshape(pcm.shape[1], -1), codes, valid, done)


class Programs:
    """The device programs of an engine of `slots` slots, padded to the shapes `table()` lists."""

    def __init__(self, model: ModelBundle, slots: int, frames_per_call: int, max_count: int):
        """`max_count`: slots updated together at most (rounded down to a power of two, at most `slots`)."""
        self.model, self.slots, self.frames_per_call = model, slots, frames_per_call
        self.max_count = 1 << (min(max_count, slots).bit_length() - 1)
        self.mimi_fresh = model.replicate(init_decoder_state(model.mimi, 1))  # what a reset Mimi row becomes

    # ------------------------------------------------------------------------------------------- shapes

    def rows(self, active: int) -> int:
        """Rows one generation program computes for `active` generating slots: a power of two (or every slot).
        On a mesh always every slot, each device running its own (generate_audio's shard_map): a subset of rows
        would be gathered from every device and computed whole on each (benchmarks/README.md, "Mesh")."""
        return self.slots if self.model.mesh is not None else min(bucket(active), self.slots)

    def count(self, n: int) -> int:
        """Slots one update or prefill program is padded to for `n` slots."""
        if not 1 <= n <= self.max_count:
            raise ValueError(f"{n} slots updated together; the engine's programs take 1 to {self.max_count}")
        return bucket(n)

    def generate_rows(self) -> list[int]:
        return sorted({self.rows(n) for n in range(1, self.slots + 1)})

    def counts(self) -> list[int]:
        return sorted({self.count(n) for n in range(1, self.max_count + 1)})

    def table(self) -> list[tuple[str, Callable]]:
        """Every program at every shape the engine runs it, each run once on slots that hold nothing, where it
        changes nothing that matters: [(what, run(state, mimi_state) -> (state, mimi_state)), ...]."""
        table = []
        for R in self.generate_rows():
            table.append((f"generate {self.frames_per_call} frames for {R} slots",
                          lambda st, ms, R=R: self.generate(st, ms, list(range(R)))[:2]))
        for R in self.counts():
            ids = list(range(R))
            for P in csm.piece_sizes():
                zeros = np.zeros((R, P, 33))
                table.append((f"prefill {R} x {P} rows", lambda st, ms, ids=ids, z=zeros: (self._piece(
                    st, self._put(ids, np.int32), self._put(z, np.int32), self._put(z, bool),
                    self._put(z[:, 0, 0], np.int32)), ms)))
            table.append((f"reset {R} slots", lambda st, ms, ids=ids: (self.reset(st, ids), ms)))
            table.append((f"start {R} slots",
                          lambda st, ms, ids=ids: self.start(st, ms, ids, [(0.0, 0, 0, 0)] * len(ids))))
            table.append((f"stop {R} slots", lambda st, ms, ids=ids: (self.stop(st, ids), ms)))
            table.append((f"rewind {R} slots", lambda st, ms, ids=ids: (self.rewind(st, ids, [0] * len(ids)), ms)))
        return table

    # ----------------------------------------------------------------------------------------- programs

    def generate(self, state, mimi_state, active: list[int]):
        """F frames for the generating slots `active` -> (state, mimi_state, the program's slot order, its
        outputs (pcm, codes, valid, done), rows in that order, on the device)."""
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
        rows each (the rest is padding)."""
        n, R = len(slot_ids), self.count(len(slot_ids))
        chosen = set(slot_ids)
        others = [s for s in range(self.slots) if s not in chosen][:R - n]
        pad = lambda x: np.concatenate([x, np.zeros((R - n,) + x.shape[1:], x.dtype)])  # noqa: E731
        padded = self._put(slot_ids + others, np.int32)
        put = lambda x: self._put(x, x.dtype)  # noqa: E731 - one transfer per piece array (replicated on a mesh)
        for t, m, ln in csm.prefill_pieces(pad(tokens), pad(mask), pad(lengths), put=put):
            state = self._piece(state, padded, t, m, ln)
        return state

    def _piece(self, state, padded, tokens, mask, lengths):
        return csm.prefill(self.model.params, self.model.cfg, state, tokens, mask, lengths, padded)

    def reset(self, state, slot_ids: list[int]):
        """The slots become empty: no context, position 0, finished."""
        return csm.reset_slots(state, self._pad(slot_ids))

    def start(self, state, mimi_state, slot_ids: list[int], sampling: list[tuple]):
        """The slots generate from their last row with `sampling` ((temperature, topk, seed, max_frames) each),
        their Mimi streams fresh."""
        R = self.count(len(slot_ids))
        cols = list(zip(*sampling))
        pad = lambda v, dtype: self._put(list(v) + [v[0]] * (R - len(v)), dtype)  # noqa: E731
        state = csm.set_sampling(state, self._pad(slot_ids), pad(cols[0], np.float32), pad(cols[1], np.int32),
                                 pad(cols[2], np.uint32), pad(cols[3], np.int32))
        fresh = np.zeros(self.slots, bool)
        fresh[slot_ids] = True
        return state, self.model.reset_mimi_rows(mimi_state, self._put(fresh, bool), self.mimi_fresh)

    def stop(self, state, slot_ids: list[int]):
        return csm.stop_slots(state, self._pad(slot_ids))

    def rewind(self, state, slot_ids: list[int], rows: list[int]):
        """The slots forget their last `rows` rows each."""
        R = self.count(len(slot_ids))
        return csm.rewind_slots(state, self._pad(slot_ids), self._put(list(rows) + [0] * (R - len(rows)), np.int32))

    # ---------------------------------------------------------------------------------------- placement

    def _put(self, values, dtype) -> jax.Array:
        """Host values to the device(s) as `dtype` (replicated on a mesh: ModelBundle.put)."""
        return self.model.put(values, dtype)

    def _pad(self, slot_ids: list[int]) -> jax.Array:
        """`slot_ids` padded to their count bucket by repeating the first (the padding writes the same values)."""
        R = self.count(len(slot_ids))
        return self._put(list(slot_ids) + [slot_ids[0]] * (R - len(slot_ids)), np.int32)
