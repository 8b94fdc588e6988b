"""The engine: one set of slots on the device that every request, stream and conversation shares.

    engine = Engine(model, slots=64, frames_per_call=4)
    engine.warmup()                                          # compiles every program it can run
    slot = engine.submit(Request("Hello there.", seed=1))    # -> slot, or None when every slot is busy
    while engine.busy():
        for slot, event in engine.step().items():            # F frames per generating slot, decoded
            send(event.owner, event.audio, event.finished)

Seams, as JetStream's prefill / insert / generate:
  prefill + insert  requests waiting since `submit` are prefilled together (bucketed by count and by prompt
                    length, in pieces of at most 128 rows: `csm.prefill_pieces`) straight into their slots: only
                    those slots of the cache are read and written, the other slots' caches are not copied.
                    Which rows each step prefills, the schedule decides (csm_jax.schedule): at most a step's
                    row budget (`prefill_rows`, less when a generating stream's audio is close to its playback),
                    so a long prompt is prefilled across steps, each keeping its offset; partly prefilled
                    prompts go on first (oldest first), then new ones, the oldest within a bounded number of
                    steps. A slot starts generating when its last rows are in.
  generate          one device program runs F = frames_per_call frames for the generating slots (only those, padded to a
                    power of two) and decodes them with the streaming Mimi decoder: one host copy of PCM, codes
                    and flags per step.
  pipelining        `step` dispatches the next program before it copies the previous one's results to the host,
                    so the host never waits on the step it just dispatched. A finished slot is seen one step
                    late: that costs one masked step for it, never a code.
Held slots (`hold`) are conversations: a slot and its KV cache kept across turns; `extend` queues rows to append
at its position (prefilled by the steps like a request's prompt, in order), `start` generates from there once
they are in, `stop` ends a reply early, `release` frees it. Their replies are streams to the schedule like plain
requests. Whoever calls `step` makes the queued rows progress: the thread driving the engine, or a
conversation waiting for its events when none does.

On a mesh (a bundle made with `mesh=`, csm_jax.sharding): the generation state and the Mimi decoder state are
split along "data" (the slot count is a multiple of its size), host values are replicated on every device,
and generation always runs every slot: each device computes its own slots, no slot moves between devices.

The generation state (csm.GenState) carries every slot's position, and attention windows follow from it on
the device: no position is mirrored on the host. One lock serialises the calls, so any thread may call in;
`driven` is set while some thread steps the engine in a loop (then others wait for their events instead).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from csm_jax import csm, sharding
from csm_jax.audio import SAMPLE_RATE
from csm_jax.bundle import ModelBundle, bucket
from csm_jax.schedule import Scheduler
from csm_jax.mimi import decode_step, init_decoder_state
from csm_jax.text import Segment

FRAME_MS = 80
FRAME_SAMPLES = 1920
MAX_SEED = 2**32 - 1  # seeds key a uint32 PRNG stream


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def frames_for(max_audio_ms) -> int:
    """Frames in `max_audio_ms` of audio (80 ms each); at least one."""
    if isinstance(max_audio_ms, bool) or not isinstance(max_audio_ms, (int, float, np.integer)) \
            or not max_audio_ms >= FRAME_MS:
        raise ValueError(f"max_audio_ms must be at least {FRAME_MS} (one frame), got {max_audio_ms!r}")
    return int(max_audio_ms // FRAME_MS)


@dataclass
class Request:
    """One utterance to speak in a fresh slot: its text after `context` (earlier turns, a voice prompt)."""

    text: str
    speaker: int = 0
    context: list[Segment] = field(default_factory=list)
    seed: int = 0
    temperature: float = 0.9
    topk: int = 50
    max_audio_ms: int = 10_000
    drop_oldest: bool = False  # drop the oldest context segments when the prompt would not fit


@dataclass
class Event:
    """What one step made for one slot."""

    owner: object  # the Request, or the holder of a held slot
    audio: np.ndarray  # new 24 kHz samples (possibly empty)
    codes: np.ndarray  # the new frames' codes (frames, 32)
    finished: bool
    error: str | None = None  # the step failed (then finished is True)


@dataclass
class _Owner:
    owner: object
    on_event: Callable[[Event], None] | None
    held: bool
    run: int = 0  # counts the slot's generations: a step's results belong to the run it was dispatched in


@dataclass
class _Prefill:
    """Prompt rows waiting to be prefilled into a slot, across as many steps as the schedule takes."""

    slot: int
    tokens: np.ndarray  # (S, 33): rows [done:] are still to prefill
    mask: np.ndarray
    sampling: tuple | None  # (temperature, topk, seed, max_frames): generate when the rows are in (None: don't)
    fresh: bool  # a request's slot: emptied before its first rows
    done: int = 0  # rows prefilled so far
    stopped: bool = False  # a held slot's reply stopped before it started: it starts done (a finished event)

    @property
    def left(self) -> int:
        return len(self.tokens) - self.done


@dataclass
class _InFlight:
    slots: list[int]  # the generating slots, in the program's row order
    owners: dict  # slot -> (the _Owner it had when the step was dispatched, its run then)
    out: tuple  # device arrays: pcm (R, F * 1920), codes (R, F, C), valid (R, F), done (R,)


@partial(jax.jit, static_argnums=(1, 6, 7), donate_argnums=(3, 4))
def generate_audio(params, cfg: csm.CsmConfig, mimi, state: csm.GenState, mimi_state, slots, num_frames: int,
                   mesh: Mesh | None = None):
    """`num_frames` frames for the slots `slots` (R,) int (None: all) and their streaming Mimi decode, in one
    program. -> (state, mimi_state, (pcm (R, F * 1920) float32, codes (R, F, C) int32, valid (R, F), done (R,))).
    Invalid frames (a finished slot) leave the Mimi state as it was; their PCM is meaningless.
    With a `mesh` (slots None; states split along "data"), each device runs its own slots: the program is
    mapped over "data" (jax.shard_map), so no slot's data moves between devices; "model" stays automatic."""
    if mesh is not None:
        if slots is not None:
            raise ValueError("on a mesh, generate_audio runs every slot (slots=None)")
        # Placed as csm_jax.sharding describes them: the states (and the per-slot results) split along "data".
        gen_spec = sharding.specs(sharding.state_shardings(state, mesh))
        mimi_spec = sharding.specs(sharding.stream_shardings(mimi_state, mesh))
        local = jax.shard_map(partial(_generate_audio, cfg=cfg, slots=None, num_frames=num_frames), mesh=mesh,
                              in_specs=(PartitionSpec(), PartitionSpec(), gen_spec, mimi_spec),
                              out_specs=(gen_spec, mimi_spec, sharding.slot_spec(state.done.shape[0], mesh)),
                              axis_names={"data"}, check_vma=False)
        return local(params, mimi, state, mimi_state)
    return _generate_audio(params, mimi, state, mimi_state, cfg=cfg, slots=slots, num_frames=num_frames)


def _generate_audio(params, mimi, state: csm.GenState, mimi_state, *, cfg: csm.CsmConfig, slots, num_frames: int):
    state, codes, valid = csm.run_frames(params, cfg, state, num_frames, slots)
    sub = mimi_state if slots is None else jax.tree.map(lambda a: a[slots], mimi_state)
    # A scan, not an unrolled loop: the Mimi decoder is compiled once per program, whatever num_frames is.
    sub, pcm = jax.lax.scan(lambda st, cv: decode_step(mimi, st, cv[0], active=cv[1]), sub,
                            (jnp.moveaxis(codes, 1, 0), valid.T))  # pcm (F, R, 1920)
    mimi_state = sub if slots is None else jax.tree.map(lambda a, b: a.at[slots].set(b), mimi_state, sub)
    done = state.done if slots is None else state.done[slots]
    return state, mimi_state, (jnp.moveaxis(pcm, 0, 1).reshape(pcm.shape[1], -1), codes, valid, done)


class Engine:
    """Slots on the device, shared by plain requests (`submit`) and held conversations (`hold`)."""

    def __init__(self, model: ModelBundle, slots: int = 4, frames_per_call: int = 4, max_prefill: int = 8,
                 prefill_rows: int = 1024, schedule: Scheduler | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        """`model`: the loaded model (csm_jax.bundle; a Generator is one).
        `max_prefill`: requests prefilled together at most; `prefill_rows`: padded prompt rows prefilled per step
        at most (a longer prompt goes in across steps), so admitting long prompts never stalls the generating
        slots.
        `schedule`: decides which waiting requests each step prefills (default: csm_jax.schedule.Scheduler
        with these two limits); `clock`: its time source, seconds."""
        if slots < 1 or frames_per_call < 1:
            raise ValueError("an engine needs at least one slot and one frame per call")
        model.check_slots(slots)
        self.model, self.cfg, self.params, self.mimi = model, model.cfg, model.params, model.mimi
        self.mesh = model.mesh
        self.slots, self.frames_per_call = slots, frames_per_call
        # Requests prefilled together: a power of two, so padding them to a bucket never needs more slots.
        self.max_prefill, self.prefill_rows = 1 << (min(max_prefill, slots).bit_length() - 1), prefill_rows
        self.schedule = schedule if schedule is not None else Scheduler(
            self.max_prefill, prefill_rows, row_step=csm.PREFILL_STEP, step_audio_s=frames_per_call * FRAME_MS / 1000)
        self.clock = clock
        self.lock = threading.RLock()
        self.driven = threading.Event()
        self.on_work: Callable[[], None] | None = None  # told when a held slot starts or stops generating
        self.reset()

    # ------------------------------------------------------------------------------------------- state

    def reset(self) -> list[_Owner]:
        """Every slot free with a fresh state (after a failed step left the state half-written).
        Returns the owners the slots had, so the caller can tell them."""
        with self.lock:
            owners = list(getattr(self, "owners", {}).values())
            self.state = self.model.new_state(self.slots)
            self.mimi_state = self.model.new_mimi_state(self.slots)
            self.mimi_fresh = self.model.replicate(init_decoder_state(self.mimi, 1))  # what a reset Mimi row becomes
            self.owners: dict[int, _Owner] = {}
            self.generating: set[int] = set()
            self.prefills: list[_Prefill] = []  # prompt rows waiting for steps, in arrival order (one per slot)
            self.inflight: _InFlight | None = None
            self.schedule.reset()
            return owners

    def fail(self, error: BaseException | str) -> list[_Owner]:
        """A step failed: every owner with a callback is told (a finished event with the error), the state
        starts afresh, and the owners are returned for the caller to tell the rest."""
        with self.lock:
            owners = self.reset()
        for o in owners:
            if o.on_event is not None:
                o.on_event(Event(o.owner, np.zeros(0, np.float32), np.zeros((0, 32), np.int32), True, str(error)))
        return owners

    def free_slots(self) -> list[int]:
        with self.lock:
            return [s for s in range(self.slots) if s not in self.owners]

    def busy(self) -> bool:
        """Work is waiting or on the device: `step` has something to do."""
        with self.lock:
            return bool(self.generating or self.prefills or self.inflight)

    # ------------------------------------------------------------------------------------ plain requests

    def submit(self, req: Request, on_event: Callable[[Event], None] | None = None) -> int | None:
        """Reserves a free slot for `req` and returns it (prefilled at the next `step`, with the others that
        came meanwhile); None when every slot is busy. Raises ValueError for a bad request (empty text, bad
        speaker or seed, prompt over budget) without touching any slot."""
        max_frames = frames_for(req.max_audio_ms)
        check_seed(req.seed)
        tokens, mask = self.model.prompt(req.context, req.speaker, req.text, max_frames, req.drop_oldest)
        with self.lock:
            slot = self._reserve(_Owner(req, on_event, held=False))
            if slot is not None:
                self.prefills.append(_Prefill(slot, tokens, mask, (req.temperature, req.topk, req.seed, max_frames),
                                              fresh=True))
            return slot

    def _reserve(self, owner: _Owner) -> int | None:
        """The lowest free slot, now owned by `owner`; None when every slot is busy."""
        free = self.free_slots()
        if not free:
            return None
        self.owners[free[0]] = owner
        return free[0]

    def cancel(self, slot: int) -> None:
        """Stops a plain request (its client went away): the slot is free at once; what its last step made
        is dropped. A held slot is stopped instead (see `stop`)."""
        with self.lock:
            o = self.owners.get(slot)
            if o is None:
                return
            if o.held:
                self.stop(slot)
                return
            del self.owners[slot]
            self.generating.discard(slot)
            self.schedule.finished(slot)
            self._drop_prefill(slot)
            self.state = csm.reset_slots(self.state, self._put([slot], np.int32))

    # --------------------------------------------------------------------------------------- held slots

    def hold(self, owner, on_event: Callable[[Event], None] | None = None) -> int | None:
        """Reserves a free slot for a conversation, empty; it stays held (its cache kept) until `release`.
        None when every slot is busy."""
        with self.lock:
            slot = self._reserve(_Owner(owner, on_event, held=True))
            if slot is not None:
                self._clear(slot)
            return slot

    def _clear(self, slot: int) -> None:
        self._drop_prefill(slot)
        self.state = csm.reset_slots(self.state, self._put([slot], np.int32))

    def clear(self, slot: int) -> None:
        """Empties a held slot's cache (position 0), to prefill it anew; rows still waiting are dropped."""
        with self.lock:
            self._held(slot)
            self._busy_held(slot, "clearing")
            self._clear(slot)

    def extend(self, slot: int, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Queues prompt rows (S, 33) to append to a held slot's cache at its position: the steps prefill them
        as the schedule allows, like a request's prompt (only the slot's part of the cache is touched). Rows
        of several calls are appended in order. The caller keeps the position below the cache's capacity."""
        with self.lock:
            self._held(slot)
            self._busy_held(slot, "extending")
            if len(tokens) == 0:
                return
            waiting = self._prefill_of(slot)
            if waiting is None:
                self.prefills.append(_Prefill(slot, np.asarray(tokens), np.asarray(mask), None, fresh=False))
            else:
                waiting.tokens = np.concatenate([waiting.tokens, tokens])
                waiting.mask = np.concatenate([waiting.mask, mask])
        if self.on_work is not None:
            self.on_work()

    def start(self, slot: int, seed: int = 0, temperature: float = 0.9, topk: int = 50,
              max_frames: int = 125) -> None:
        """Generates from a held slot's last row until end of speech or `max_frames` (once its queued rows are
        in): events go to its owner, the last one with finished=True. The frames stay in the slot's cache."""
        with self.lock:
            self._held(slot)
            check_seed(seed)
            self._busy_held(slot, "starting")
            sampling = (temperature, topk, seed, max_frames)
            waiting = self._prefill_of(slot)
            if waiting is None:
                self._start_slots([slot], [sampling])
            else:
                waiting.sampling = sampling
        if self.on_work is not None:
            self.on_work()

    def stop(self, slot: int) -> None:
        """Ends a held slot's reply early; a finished event follows (frames already made are delivered; none
        when the reply had not started: its rows still go in, then it finishes at once)."""
        with self.lock:
            waiting = self._prefill_of(slot)
            if waiting is not None and waiting.sampling is not None:
                waiting.stopped = True
                return
            if slot not in self.generating:
                return
            self.state = csm.stop_slots(self.state, self._put([slot], np.int32))
        if self.on_work is not None:
            self.on_work()

    def rewind(self, slot: int, rows: int) -> None:
        """A held slot forgets its last `rows` rows (frames made after a reply was stopped but never heard)."""
        with self.lock:
            self._held(slot)
            self._busy_held(slot, "rewinding")
            if self._prefill_of(slot) is not None:
                raise RuntimeError(f"slot {slot} has rows waiting to be prefilled; rewind it before extending it")
            self.state = csm.rewind_slots(self.state, self._put([slot], np.int32), self._put([rows], np.int32))

    def release(self, slot: int) -> None:
        """Frees a held slot (rows still waiting are dropped)."""
        with self.lock:
            if slot in self.owners:
                del self.owners[slot]
                self.generating.discard(slot)
                self.schedule.finished(slot)
                self._clear(slot)

    def _busy_held(self, slot: int, what: str) -> None:
        waiting = self._prefill_of(slot)
        if slot in self.generating or (waiting is not None and waiting.sampling is not None):
            raise RuntimeError(f"slot {slot} is generating; wait for its finished event before {what} it")

    def _prefill_of(self, slot: int) -> _Prefill | None:
        return next((p for p in self.prefills if p.slot == slot), None)

    def _drop_prefill(self, slot: int) -> None:
        self.prefills = [p for p in self.prefills if p.slot != slot]

    def waiting_rows(self, slot: int) -> int:
        """Rows queued for `slot` that the steps have not prefilled yet."""
        with self.lock:
            p = self._prefill_of(slot)
            return 0 if p is None else p.left

    def holder(self, slot: int):
        """Who holds `slot` (None when nobody does, e.g. after `fail`)."""
        with self.lock:
            o = self.owners.get(slot)
            return o.owner if o is not None and o.held else None

    def _held(self, slot: int) -> None:
        o = self.owners.get(slot)
        if o is None or not o.held:
            raise ValueError(f"slot {slot} is not held (hold it first)")

    # ------------------------------------------------------------------------------------------ the loop

    def step(self) -> dict[int, Event]:
        """Prefills the queued rows the schedule picks (starting the slots whose prompts are in), dispatches F
        frames for every generating slot, and returns what the previous step made ({slot: Event}; events also
        go to the owners' callbacks). A finished plain request's slot is free at once."""
        with self.lock:
            cost = self._admit()
            launched = self._launch()
            previous, self.inflight = self.inflight, launched
            events = self._collect(previous) if previous is not None else {}
            self.schedule.step_done(self.clock(), cost, measured=previous is not None)
            return events

    def _admit(self) -> int:
        """Prefills the rows the schedule picks for this step (partly prefilled prompts first, oldest first,
        then new ones) and starts the slots whose last rows are in; returns the padded rows it computes."""
        order = [p for p in self.prefills if p.done] + [p for p in self.prefills if not p.done]
        chosen = dict(self.schedule.admit(self.clock(), [(p.slot, p.left) for p in order]))
        if not chosen:
            return 0
        take = [p for p in order if p.slot in chosen]
        slots = [p.slot for p in take]
        n, R = len(take), bucket(len(take))
        # Padding of the prefill batch: other slots (distinct) given no rows, so they are read and written back
        # unchanged.
        others = [s for s in range(self.slots) if s not in slots][:R - n]
        rows = [chosen[p.slot] for p in take]
        tokens = np.zeros((R, max(rows), 33), np.int32)
        mask = np.zeros((R, max(rows), 33), bool)
        lengths = np.zeros(R, np.int32)
        for r, (p, k) in enumerate(zip(take, rows)):
            tokens[r, :k], mask[r, :k], lengths[r] = p.tokens[p.done:p.done + k], p.mask[p.done:p.done + k], k
        fresh = [p.slot for p in take if p.fresh and p.done == 0]
        if fresh:
            self.state = csm.reset_slots(self.state, self._pad(fresh, bucket(len(fresh))))
        padded = self._put(slots + others, np.int32)
        for t, m, ln in self._pieces(tokens, mask, lengths):
            self.state = csm.prefill(self.params, self.cfg, self.state, t, m, ln, padded)
        for p, k in zip(take, rows):
            p.done += k
        complete = [p for p in take if not p.left]
        self.prefills = [p for p in self.prefills if p.left]
        starting = [p for p in complete if p.sampling is not None]
        if starting:
            self._start_slots([p.slot for p in starting], [p.sampling for p in starting])
            stopped = [p.slot for p in starting if p.stopped]
            if stopped:
                self.state = csm.stop_slots(self.state, self._pad(stopped, bucket(len(stopped))))
        return self.schedule.cost(rows)

    def _start_slots(self, slots: list[int], sampling: list[tuple]) -> None:
        R = bucket(len(slots))
        cols = list(zip(*sampling))
        pad = lambda v, dtype: self._put(list(v) + [v[0]] * (R - len(v)), dtype)  # noqa: E731
        self.state = csm.set_sampling(self.state, self._pad(slots, R), pad(cols[0], np.float32),
                                      pad(cols[1], np.int32), pad(cols[2], np.uint32), pad(cols[3], np.int32))
        fresh = np.zeros(self.slots, bool)
        fresh[slots] = True
        self.mimi_state = self.model.reset_mimi_rows(self.mimi_state, self._put(fresh, bool), self.mimi_fresh)
        for s in slots:
            self.owners[s].run += 1
        self.generating.update(slots)

    def _launch(self) -> _InFlight | None:
        if not self.generating:
            return None
        active = sorted(self.generating)
        R = self._rows(len(active))
        if R >= self.slots:
            order, slots = list(range(self.slots)), None
        else:  # only the generating slots, padded with other (distinct) slots, which are done: left as they are
            order = active + [s for s in range(self.slots) if s not in self.generating][:R - len(active)]
            slots = self._put(order, np.int32)
        self.state, self.mimi_state, out = generate_audio(self.params, self.cfg, self.mimi, self.state,
                                                          self.mimi_state, slots, self.frames_per_call,
                                                          self.mesh)
        for a in out:
            a.copy_to_host_async()
        return _InFlight(order, {s: (self.owners[s], self.owners[s].run) for s in active}, out)

    def _collect(self, flight: _InFlight) -> dict[int, Event]:
        pcm, codes, valid, done = (np.asarray(a) for a in flight.out)
        now = self.clock()
        events = {}
        for r, slot in enumerate(flight.slots):
            o, run = flight.owners.get(slot, (None, None))
            # Skip idle padding, a slot cancelled or re-assigned since, and a run that finished at an earlier
            # step (this step computed it masked).
            if o is None or self.owners.get(slot) is not o or o.run != run or slot not in self.generating:
                continue
            v = valid[r]
            audio = pcm[r].reshape(-1, FRAME_SAMPLES)[v].reshape(-1)
            ev = Event(o.owner, audio, codes[r][v], bool(done[r]))
            self.schedule.delivered(slot, now, audio.size / SAMPLE_RATE)
            if ev.finished:
                self.schedule.finished(slot)
                self.generating.discard(slot)
                if not o.held:
                    del self.owners[slot]
            events[slot] = ev
            if o.on_event is not None:
                o.on_event(ev)
        return events

    # ---------------------------------------------------------------------------------------- warm-up

    def warmup(self, progress: Callable[[str], None] | None = None) -> int:
        """Compiles every program the engine can run (generation for each count of generating slots, prefill
        for each piece size and count of requests admitted together, slot updates), by running each once on
        free slots, where it changes nothing. Uses JAX's on-disk compile cache when enabled. Returns the
        number of programs run. Call it with every slot free."""
        with self.lock:
            if self.owners:
                raise RuntimeError("warm the engine up before it has work")
            counts = sorted({self._rows(n) for n in range(1, self.slots + 1)})
            prefill_counts = [1 << i for i in range(self.max_prefill.bit_length())]
            total = len(counts) + len(prefill_counts) * (len(csm.piece_sizes()) + 4)
            done = 0

            def tick(what):
                nonlocal done
                done += 1
                if progress is not None:
                    progress(f"compiling {done}/{total}: {what}")

            for R in counts:
                slots = None if R >= self.slots else self._put(np.arange(R), np.int32)
                self.state, self.mimi_state, out = generate_audio(self.params, self.cfg, self.mimi, self.state,
                                                                  self.mimi_state, slots, self.frames_per_call,
                                                                  self.mesh)
                jax.block_until_ready(out)
                tick(f"generate {self.frames_per_call} frames for {R} slots")
            for R in prefill_counts:
                sl = self._put(np.arange(R), np.int32)
                for P in csm.piece_sizes():
                    zeros = np.zeros((R, P, 33))
                    self.state = csm.prefill(self.params, self.cfg, self.state, self._put(zeros, np.int32),
                                             self._put(zeros, bool), self._put(zeros[:, 0, 0], np.int32), sl)
                    jax.block_until_ready(self.state.h)
                    tick(f"prefill {R} x {P} rows")
                self.state = csm.reset_slots(self.state, sl)
                tick(f"reset {R} slots")
                z = np.zeros(R)
                self.state = csm.set_sampling(self.state, sl, self._put(z, np.float32), self._put(z, np.int32),
                                              self._put(z, np.uint32), self._put(z, np.int32))
                tick(f"start {R} slots")
                self.state = csm.stop_slots(self.state, sl)
                tick(f"stop {R} slots")
                self.state = csm.rewind_slots(self.state, sl, self._put(z, np.int32))
                jax.block_until_ready(self.state.done)
                tick(f"rewind {R} slots")
            self.mimi_state = self.model.reset_mimi_rows(self.mimi_state, self._put(np.zeros(self.slots), bool),
                                                         self.mimi_fresh)
            self.state = csm.reset_slots(self.state, self._put(np.arange(self.slots), np.int32))
            jax.block_until_ready(self.state.done)
            return done


    # -------------------------------------------------------------------------------------- placement

    def _put(self, values, dtype) -> jax.Array:
        """Host values to the device(s) as `dtype` (replicated on a mesh: ModelBundle.put)."""
        return self.model.put(values, dtype)

    def _pad(self, slots: list[int], R: int) -> jax.Array:
        """`slots` padded to R entries by repeating the first (the padding writes the same values again)."""
        return self._put(slots + [slots[0]] * (R - len(slots)), np.int32)

    def _pieces(self, tokens: np.ndarray, mask: np.ndarray, lengths):
        """csm.prefill_pieces, each piece transferred once (replicated on the mesh when there is one)."""
        return csm.prefill_pieces(tokens, mask, lengths, put=lambda x: self._put(x, x.dtype))

    def _rows(self, active: int) -> int:
        """Rows one generation program computes for `active` generating slots: a power of two (or every slot).
        On a mesh always every slot, each device running its own (generate_audio's shard_map): a subset of rows
        would be gathered from every device and computed whole on each (benchmarks/README.md, "Mesh")."""
        return self.slots if self.mesh is not None else min(bucket(active), self.slots)
