"""The engine: one set of slots on the device that every request, stream and conversation shares.

    engine = Engine(model, slots=64)                         # model: a csm_jax.bundle.ModelBundle
    engine.warmup()                                          # compiles every program it can run
    slot = engine.submit(Request("Hello there.", seed=1))    # -> slot, or None when every slot is busy
    while engine.busy():
        for slot, event in engine.step().items():            # F frames per generating slot, decoded
            send(event.owner, event.audio, event.finished)

The engine keeps the slots and runs the device programs; it has no thread and calls nobody back: `step`
returns its events to its caller. csm_jax.driver is that caller for every user of generation (admission with
a capacity, events to their owners, cancel, failure recovery, shutdown).

Seams, as JetStream's prefill / insert / generate:
  prefill + insert  requests waiting since `submit` are prefilled together (grouped by prompt length, in
                    programs of 64, 8 or 1 requests, in pieces of at most 128 rows: `csm.prefill_pieces`)
                    straight into their slots: only those slots of the cache are read and written, the other
                    slots' caches are not copied. Which rows each step prefills, the schedule decides
                    (csm_jax.schedule: its PrefillQueue and Scheduler): as many waiting requests as a step's row
                    budget holds (`prefill_rows`, less when a generating stream's audio is close to its
                    playback), so a long prompt is prefilled across steps, each keeping its offset. A slot
                    starts generating when its last rows are in.
  generate          one device program runs F = frames_per_call frames for the generating slots and decodes them
                    with the streaming Mimi decoder (its PCM also as 16-bit PCM, converted on the device): one
                    host copy of PCM, codes and flags per step; each slot's event gets views of it, no copy.
  pipelining        `step` dispatches the next program before it copies the previous one's results to the host,
                    so the host never waits on the step it just dispatched. A finished slot is seen one step
                    late: that costs one masked step for it, never a code.
Every device program and the shapes it runs at are listed once (csm_jax.programs): admission, generation and
warm-up all go through that table.

Held slots (`hold`) are conversations: a slot and its KV cache kept across turns; `extend` queues rows to append
at its position (prefilled by the steps like a request's prompt, in order), `start` generates from there once
they are in, `stop` ends a reply early, `release` frees it. Their replies are streams to the schedule like plain
requests.

On a mesh (a bundle made with `mesh=`, csm_jax.sharding): the generation state and the Mimi decoder state are
split along "data" (the slot count is a multiple of its size), host values are replicated on every device,
and generation always runs every slot: each device computes its own slots, no slot moves between devices.

The generation state (csm.GenState) carries every slot's position, and attention windows follow from it on
the device: no position is mirrored on the host. One lock serialises the calls, so any thread may call in.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from csm_jax.audio import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE
from csm_jax.bundle import ModelBundle, memory_device
from csm_jax.csm import PREFILL_STEP
from csm_jax.programs import Programs
from csm_jax.request import Event, Request, check_sampling, check_seed, frames_for
from csm_jax.schedule import PrefillQueue, Scheduler

FRAMES_PER_CALL = 4  # frames per step wherever none is given: 320 ms of audio, a stream's first audio after one step


class Prompt(NamedTuple):
    """A request made ready for a slot: its prompt rows and how to generate after them."""

    tokens: np.ndarray  # (S, 33)
    mask: np.ndarray
    sampling: tuple  # (temperature, topk, seed, max_frames)


@dataclass
class _Owner:
    owner: object
    held: bool
    run: int = 0  # counts the slot's generations: a step's results belong to the run it was dispatched in


@dataclass
class _InFlight:
    order: list[int]  # the slots of the program's rows, in order (generating ones and padding)
    owners: dict  # slot -> (the _Owner it had when the step was dispatched, its run then)
    out: tuple  # device arrays: pcm (R, F * 1920), pcm16 (R, F * 1920), codes (R, F, C), valid (R, F), done (R,)


class Engine:
    """Slots on the device, shared by plain requests (`submit`) and held conversations (`hold`)."""

    def __init__(self, model: ModelBundle, slots: int = 4, frames_per_call: int = FRAMES_PER_CALL,
                 max_prefill: int | None = None, prefill_rows: int = 8192, schedule: Scheduler | None = None,
                 clock: Callable[[], float] = time.perf_counter, programs: Programs | None = None):
        """`model`: the loaded model (csm_jax.bundle).
        `max_prefill`: requests prefilled at one step at most (None: as many as the rows allow);
        `prefill_rows`: padded prompt rows prefilled per step at most (a longer prompt goes in across steps), so
        admitting long prompts never stalls the generating slots.
        `schedule`: decides which waiting requests each step prefills (default: csm_jax.schedule.Scheduler
        with these two limits); `clock`: its time source, seconds.
        `programs`: the device programs (default: csm_jax.programs.Programs of `model`); a stand-in with their
        methods, made for the same slots and frames per call, runs the engine without a device
        (csm_jax.testing.stub_device)."""
        if slots < 1 or frames_per_call < 1:
            raise ValueError("an engine needs at least one slot and one frame per call")
        model.check_slots(slots)
        self.model, self.cfg = model, model.cfg
        self.slots, self.frames_per_call = slots, frames_per_call
        self.programs = programs if programs is not None else Programs(model, slots, frames_per_call)
        if (self.programs.slots, self.programs.frames_per_call) != (slots, frames_per_call):
            raise ValueError(f"the programs were made for {self.programs.slots} slots and "
                             f"{self.programs.frames_per_call} frames per call, the engine has {slots} and "
                             f"{frames_per_call}: make them with the engine's")
        self.max_prefill, self.prefill_rows = max_prefill, prefill_rows
        self.schedule = schedule if schedule is not None else Scheduler(
            max_prefill, prefill_rows, row_step=PREFILL_STEP, step_audio_s=frames_per_call * FRAME_MS / 1000)
        self.clock = clock
        self.lock = threading.RLock()
        self.prefilled_rows = 0  # prompt rows prefilled since the start (resets included)
        self.reset()

    # ------------------------------------------------------------------------------------------- state

    def reset(self) -> list:
        """Every slot free with a fresh state (after a failed step left the state half-written). Returns the
        owners the slots had (as given to `submit`/`insert`/`hold`), for the caller to tell."""
        with self.lock:
            owners = [o.owner for o in getattr(self, "owners", {}).values()]
            self.state = self.model.new_state(self.slots)
            self.mimi_state = self.model.new_mimi_state(self.slots)
            self.owners: dict[int, _Owner] = {}
            self.generating: set[int] = set()
            self.queue = PrefillQueue()  # prompt rows waiting for steps (one entry per slot)
            self.inflight: _InFlight | None = None
            self.schedule.reset()
            return owners

    def free_slots(self) -> list[int]:
        with self.lock:
            return [s for s in range(self.slots) if s not in self.owners]

    def slots_in_use(self) -> int:
        """Slots reserved or held, read without waiting for a step or warm-up under way (a count for metrics)."""
        return len(self.owners)

    def busy(self) -> bool:
        """Work is waiting or on the device: `step` has something to do."""
        with self.lock:
            return bool(self.generating or self.queue or self.inflight)

    # ------------------------------------------------------------------------------------ plain requests

    def prepare(self, req: Request) -> Prompt:
        """The request's prompt rows and sampling; ValueError for a bad request (empty text, bad speaker, seed
        or sampling, prompt over budget). Touches no slot."""
        max_frames = frames_for(req.max_audio_ms)
        check_seed(req.seed)
        check_sampling(req.temperature, req.topk)
        tokens, mask = self.model.prompt(req.context, req.speaker, req.text, max_frames, req.drop_oldest)
        return Prompt(tokens, mask, (req.temperature, req.topk, req.seed, max_frames))

    def insert(self, owner, prompt: Prompt) -> int | None:
        """Reserves the lowest free slot for `owner`'s prompt and returns it (prefilled by the next steps, with
        the others that came meanwhile); None when every slot is busy. Events of the slot carry `owner`."""
        with self.lock:
            slot = self._reserve(_Owner(owner, held=False))
            if slot is not None:
                self.queue.add(slot, prompt.tokens, prompt.mask, prompt.sampling, fresh=True)
            return slot

    def submit(self, req: Request) -> int | None:
        """`insert(req, prepare(req))`: the request's slot, or None when every slot is busy."""
        return self.insert(req, self.prepare(req))

    def _reserve(self, owner: _Owner) -> int | None:
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
            self._clear(slot)

    # --------------------------------------------------------------------------------------- held slots

    def hold(self, owner) -> int | None:
        """Reserves a free slot for a conversation, empty; it stays held (its cache kept) until `release`.
        None when every slot is busy."""
        with self.lock:
            slot = self._reserve(_Owner(owner, held=True))
            if slot is not None:
                self._clear(slot)
            return slot

    def _clear(self, slot: int) -> None:
        self.queue.drop(slot)
        self.state = self.programs.reset(self.state, [slot])

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
            if len(tokens):
                self.queue.append(slot, tokens, mask)

    def start(self, slot: int, seed: int = 0, temperature: float = 0.9, topk: int = 50,
              max_frames: int = 125) -> None:
        """Generates from a held slot's last row until end of speech or `max_frames` (once its queued rows are
        in): events go to its owner, the last one with finished=True. The frames stay in the slot's cache."""
        with self.lock:
            self._held(slot)
            check_seed(seed)
            check_sampling(temperature, topk)
            self._busy_held(slot, "starting")
            sampling = (temperature, topk, seed, max_frames)
            waiting = self.queue.of(slot)
            if waiting is None:
                self._start_slots([slot], [sampling])
            else:
                waiting.sampling = sampling

    def stop(self, slot: int) -> None:
        """Ends a held slot's reply early; a finished event follows (frames already made are delivered; none
        when the reply had not started: its rows still go in, then it finishes at once)."""
        with self.lock:
            waiting = self.queue.of(slot)
            if waiting is not None and waiting.sampling is not None:
                waiting.stopped = True
            elif slot in self.generating:
                self.state = self.programs.stop(self.state, [slot])

    def rewind(self, slot: int, rows: int) -> None:
        """A held slot forgets its last `rows` rows (frames made after a reply was stopped but never heard)."""
        with self.lock:
            self._held(slot)
            self._busy_held(slot, "rewinding")
            if self.queue.of(slot) is not None:
                raise RuntimeError(f"slot {slot} has rows waiting to be prefilled; rewind it before extending it")
            self.state = self.programs.rewind(self.state, [slot], [rows])

    def release(self, slot: int) -> None:
        """Frees a held slot (rows still waiting are dropped)."""
        with self.lock:
            if slot in self.owners:
                del self.owners[slot]
                self.generating.discard(slot)
                self.schedule.finished(slot)
                self._clear(slot)

    def waiting_rows(self, slot: int) -> int:
        """Rows queued for `slot` that the steps have not prefilled yet."""
        with self.lock:
            return self.queue.rows_left(slot)

    def holder(self, slot: int):
        """Who holds `slot` (None when nobody does, e.g. after `reset`)."""
        with self.lock:
            o = self.owners.get(slot)
            return o.owner if o is not None and o.held else None

    def _busy_held(self, slot: int, what: str) -> None:
        waiting = self.queue.of(slot)
        if slot in self.generating or (waiting is not None and waiting.sampling is not None):
            raise RuntimeError(f"slot {slot} is generating; wait for its finished event before {what} it")

    def _held(self, slot: int) -> None:
        o = self.owners.get(slot)
        if o is None or not o.held:
            raise ValueError(f"slot {slot} is not held (hold it first)")

    # ------------------------------------------------------------------------------------------ the step

    def step(self) -> dict[int, Event]:
        """Prefills the queued rows the schedule picks (starting the slots whose prompts are in), dispatches F
        frames for every generating slot, and returns what the previous step made: {slot: Event}. A finished
        plain request's slot is free at once."""
        with self.lock:
            cost = self._admit()
            launched = self._launch()
            previous, self.inflight = self.inflight, launched
            events = self._collect(previous) if previous is not None else {}
            self.schedule.step_done(self.clock(), cost, measured=previous is not None)
            return events

    def _admit(self) -> int:
        """Prefills the rows the schedule picks for this step and starts the slots whose last rows are in;
        returns the padded rows it computes."""
        order = self.queue.waiting()
        chosen = dict(self.schedule.admit(self.clock(), [(p.slot, p.left) for p in order]))
        if not chosen:
            return 0
        taken = [(p, chosen[p.slot]) for p in order if p.slot in chosen]
        fresh = [p.slot for p, _ in taken if p.fresh and p.prefilled == 0]
        if fresh:
            self.state = self.programs.reset(self.state, fresh)
        for idx, length in self.schedule.groups([rows for _, rows in taken]):
            tokens = np.zeros((len(idx), length, 33), np.int32)
            mask = np.zeros((len(idx), length, 33), bool)
            lengths = np.zeros(len(idx), np.int32)
            for r, i in enumerate(idx):
                p, rows = taken[i]
                span = slice(p.prefilled, p.prefilled + rows)
                tokens[r, :rows], mask[r, :rows], lengths[r] = p.tokens[span], p.mask[span], rows
            self.state = self.programs.prefill(self.state, [taken[i][0].slot for i in idx], tokens, mask, lengths)
            self.prefilled_rows += int(lengths.sum())
        starting = [p for p in self.queue.advance(taken) if p.sampling is not None]
        if starting:
            self._start_slots([p.slot for p in starting], [p.sampling for p in starting])
            stopped = [p.slot for p in starting if p.stopped]
            if stopped:
                self.state = self.programs.stop(self.state, stopped)
        return self.schedule.cost([rows for _, rows in taken])

    def _start_slots(self, slot_ids: list[int], sampling: list[tuple]) -> None:
        self.state, self.mimi_state = self.programs.start(self.state, self.mimi_state, slot_ids, sampling)
        for s in slot_ids:
            self.owners[s].run += 1
        self.generating.update(slot_ids)

    def _launch(self) -> _InFlight | None:
        if not self.generating:
            return None
        active = sorted(self.generating)
        self.state, self.mimi_state, order, out = self.programs.generate(self.state, self.mimi_state, active)
        for a in out:
            a.copy_to_host_async()
        return _InFlight(order, {s: (self.owners[s], self.owners[s].run) for s in active}, out)

    def _collect(self, flight: _InFlight) -> dict[int, Event]:
        pcm, pcm16, codes, valid, done = (np.asarray(a) for a in flight.out)
        # A slot's valid frames are its first ones (a slot once done stays done), so its audio is the start of
        # its row: each event gets views of the step's PCM, which no slot copies (its codes, small, are copied).
        frames, done = valid.sum(1).tolist(), done.tolist()
        now = self.clock()
        events = {}
        for r, slot in enumerate(flight.order):
            o, run = flight.owners.get(slot, (None, None))
            # Skip idle padding, a slot cancelled or re-assigned since, and a run that finished at an earlier
            # step (this step computed it masked).
            if o is None or self.owners.get(slot) is not o or o.run != run or slot not in self.generating:
                continue
            f = frames[r]
            n = f * FRAME_SAMPLES
            ev = Event(o.owner, pcm[r, :n], pcm16[r, :n], codes[r, :f].copy(), done[r])
            self.schedule.delivered(slot, now, n / SAMPLE_RATE)
            if ev.finished:
                self.schedule.finished(slot)
                self.generating.discard(slot)
                if not o.held:
                    del self.owners[slot]
            events[slot] = ev
        return events

    # ---------------------------------------------------------------------------------------- warm-up

    def programs_to_compile(self) -> int:
        """How many programs `warmup` compiles."""
        return len(self.programs.table(self.state, self.mimi_state))

    def warmup(self, progress: Callable[[int, int, str], None] | None = None, workers: int | None = None) -> int:
        """Compiles every program the engine can run (csm_jax.programs' table: generation for each bucket of
        generating slots, prefill for each group count and piece size, slot updates) ahead of time, `workers`
        at once (default: one per core), running none; uses JAX's on-disk compile cache when enabled.
        `progress(compiled, total, what)` after each. Returns the number of programs. Call it with every slot
        free. `compiled` keeps each program with its compiled form (its memory analysis). A device whose
        memory (beside the state and the parameters) cannot hold the largest program's scratch fails here
        (RuntimeError, with how much), not at the first request that runs it."""
        with self.lock:
            if self.owners:
                raise RuntimeError("warm the engine up before it has work")
            self.compiled = self.programs.compile(self.state, self.mimi_state, progress, workers)
            self._check_scratch()
            return len(self.compiled)

    def _check_scratch(self) -> None:
        if not self.compiled:
            return
        stats = memory_device(self.model.mesh).memory_stats()
        if not stats or "bytes_limit" not in stats:
            return
        need, what = max((m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes, p.what)
                         for p, m in ((p, c.memory_analysis()) for p, c in self.compiled))
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if need > free:
            raise RuntimeError(f"the program '{what}' needs {need / 2**30:.1f} GiB of scratch, and the device has "
                               f"{free / 2**30:.1f} GiB free beside the state of {self.slots} slots and the "
                               "parameters: use fewer slots (or --slots auto)")
