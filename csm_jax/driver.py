"""The driver: the one loop that steps an engine, and the way every user of generation hands it work.

    driver = gen.driver(slots=8, max_queue=16)              # csm_jax.generate.Generator: an Engine and its driver
    with driver:                                            # a thread steps the engine (start_thread ... close)
        ticket = driver.submit(Request("Hello."), sink)     # sink(event) is called from the driver's thread
    driver.run()                                            # or: in the caller's thread until all is done
                                                            # (`for _ in driver.steps()`: between steps)
It owns:
  admission  `submit` checks the request (ValueError) and queues it; it enters a free slot at the next turn. At
             most `slots + max_queue` requests are admitted at once (in a slot, prefilled or waiting); beyond
             that `submit` raises Full (the server answers 429).
  events     each step's events go to their owner's sink, from the thread that steps; an owner's last event
             has finished=True, and `error` when its work ended unfinished (a failure, or `shutdown`). The
             engine calls nobody: `_step` is the one place it is stepped.
  cancel     a waiting request leaves at once, one in a slot at the next turn.
  failure    a step that raises ends every request (in a slot or waiting) and held slot with an error event and
             resets the engine. The thread then checks it with a one-frame probe, retried with backoff, while
             `submit` raises EngineFailed; in the caller's thread (`run`, `steps`) the error is raised.
  shutdown   `shutdown(grace)`: new requests are refused (ShuttingDown), waiting ones end now, those in a slot
             get `grace` seconds, then end (`shutdown` set on their event).
  warm-up    `start_thread(warmup=True)` first compiles every program the engine can run (`warmup_progress`:
             programs compiled of the total). A failure there (or anything else that would end the thread) is
             fatal: `fatal` holds it, whoever waits is told, and `on_fatal(error)` is called (the server ends
             its process with the cause).
Conversations (csm_jax.dialogue) hold slots through it (`hold`, `extend`, `start`, `stop`, `rewind`, `clear`,
`release`): each goes to the engine and wakes the thread; their events come to the holder's sink. They need the
thread: `wait_prefilled` and a dialogue waiting for its events raise when no thread runs the driver.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

from csm_jax.audio import FRAME_MS
from csm_jax.engine import Engine, Prompt
from csm_jax.request import Event, Request

PROBE = Request("Hello.", max_audio_ms=FRAME_MS)  # one frame: a reset engine works again when it is made
log = logging.getLogger("csm_jax.driver")


class Full(RuntimeError):
    """Every slot and queue place is taken; retry when one is free."""


class EngineFailed(RuntimeError):
    """The engine failed (or could not start) while the request was in flight, waiting, or being submitted."""


class ShuttingDown(RuntimeError):
    """The driver is stopping and takes no more work."""


@dataclass(eq=False)
class Ticket:
    """A request (or a held slot's holder) handed to the driver, and where its events go; the engine's owner."""

    owner: object  # the Request, or the holder of a held slot
    sink: Callable[[Event], None]
    held: bool = False
    prompt: Prompt | None = None  # a request's rows until it has a slot
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False
    counted: bool = True  # takes one of the `capacity` places until it finishes
    slotted: float | None = None  # when it entered its slot (time.monotonic())


class Driver:
    """Steps one engine: admission with a capacity, events to their owners, cancel, recovery, shutdown."""

    def __init__(self, engine: Engine, max_queue: int = 0, on_fatal: Callable[[BaseException], None] | None = None):
        """`max_queue`: requests that may wait for a slot beyond the engine's slots. `on_fatal(error)`: called
        from the driver's thread when it ends for good (its warm-up failed)."""
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue}")
        self.engine, self.capacity, self.on_fatal = engine, engine.slots + max_queue, on_fatal
        self.cond = threading.Condition()
        self.pending: deque[Ticket] = deque()  # submitted, waiting for a slot
        self.jobs: dict[int, Ticket] = {}  # requests in a slot
        self.gone: list[Ticket] = []  # cancelled in a slot: cancelled in the engine at the next turn
        self.admitted = 0  # requests pending, being submitted or in a slot: at most `capacity`
        self.failure: str | None = None  # set from a failed step until the engine is checked again
        self.failures = self.restarts = 0  # failed steps (and checks after a reset); resets checked good
        self.on_step: Callable[[float, dict], None] = lambda seconds, events: None  # each step's (metrics)
        self.fatal, self.fatal_what = None, ""  # the error (BaseException) the thread ended on, and in what
        self.warming, self.warmup_progress = False, (0, 0)  # programs compiled, of the total
        self.stopping, self.deadline = False, math.inf  # when stopping: requests still in a slot then are ended
        self.thread: threading.Thread | None = None
        self.stepping = False  # a thread (the driver's, or a caller's `run`) steps the engine

    # ------------------------------------------------------------------------------------- requests

    def submit(self, request: Request, sink: Callable[[Event], None]) -> Ticket:
        """Queues `request`; its events go to `sink`. Raises ValueError for a bad request, Full when every place
        is taken, EngineFailed while the engine is being reset (or could not start), ShuttingDown once stopping."""
        with self.cond:
            self._check_open()
            if self.admitted >= self.capacity:
                raise Full(f"all {self.capacity} places ({self.engine.slots} slots and "
                           f"{self.capacity - self.engine.slots} queued) are taken")
            self.admitted += 1
        try:
            ticket = Ticket(request, sink, prompt=self.engine.prepare(request))
        except BaseException:
            with self.cond:
                self.admitted -= 1
            raise
        with self.cond:
            try:
                self._check_open()  # it may have changed while the prompt was made
            except Exception:
                self.admitted -= 1
                raise
            self.pending.append(ticket)
            self.cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The request's owner went away: a waiting request leaves now, one in a slot at the next turn. No event
        follows. Cancelling a finished or cancelled request does nothing."""
        with self.cond:
            if ticket.cancelled or ticket.finished:
                return
            ticket.cancelled = True
            if ticket in self.pending:
                self.pending.remove(ticket)
                ticket.finished = True
                self.admitted -= 1
            else:
                self.gone.append(ticket)
            self.cond.notify_all()

    def _check_open(self) -> None:
        if self.fatal is not None:
            raise EngineFailed(self.stopped_because())
        if self.stopping:
            raise ShuttingDown("shutting down: no new requests are taken")
        if self.failure is not None:
            raise EngineFailed(self.failure)

    # ----------------------------------------------------------------------------------- held slots

    def hold(self, owner, sink: Callable[[Event], None]) -> int | None:
        """A free slot held for `owner` (Engine.hold), its events to `sink`; None when every slot is busy."""
        return self.engine.hold(Ticket(owner, sink, held=True, counted=False))

    def holder(self, slot: int):
        """Who holds `slot` (None when nobody does, e.g. after a failure reset the engine)."""
        ticket = self.engine.holder(slot)
        return None if ticket is None else ticket.owner

    def extend(self, slot: int, tokens, mask) -> None:
        self.engine.extend(slot, tokens, mask)
        self._wake()

    def start(self, slot: int, seed: int = 0, temperature: float = 0.9, topk: int = 50, max_frames: int = 125) -> None:
        self.engine.start(slot, seed, temperature, topk, max_frames)
        self._wake()

    def stop(self, slot: int) -> None:
        self.engine.stop(slot)
        self._wake()

    def rewind(self, slot: int, rows: int) -> None:
        self.engine.rewind(slot, rows)

    def clear(self, slot: int) -> None:
        self.engine.clear(slot)

    def release(self, slot: int) -> None:
        self.engine.release(slot)
        self._wake()  # a request may be waiting for the slot

    def waiting_rows(self, slot: int) -> int:
        return self.engine.waiting_rows(slot)

    def wait_prefilled(self, slot: int) -> None:
        """Returns once the rows queued for `slot` are in its cache (or dropped: a failure reset the engine)."""
        with self.cond:
            while self.engine.waiting_rows(slot):
                self.check_running()
                self.cond.wait(0.5)

    def check_running(self) -> None:
        """Raises when no thread runs the driver: whoever waits for a step would wait forever."""
        if self.fatal is not None:
            raise RuntimeError(self.stopped_because()) from self.fatal
        if self.thread is None or not self.thread.is_alive():
            raise RuntimeError("no thread runs the driver: start it (driver.start_thread(), or `with driver:`) "
                               "before a dialogue uses it")

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # ------------------------------------------------------------------------------------- running

    def start_thread(self, warmup: bool = False) -> "Driver":
        """Steps the engine in a background thread from now on (after compiling every program with `warmup`)."""
        with self.cond:
            self._claim()
            self.warming = warmup
            self.thread = threading.Thread(target=self._run, args=(warmup,), daemon=True, name="csm-driver")
        self.thread.start()
        return self

    def __enter__(self) -> "Driver":
        return self if self.thread is not None else self.start_thread()

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self) -> None:
        """Steps the engine in the caller's thread until every submitted request is done."""
        for _ in self.steps():
            pass

    def steps(self) -> Iterator[None]:
        """Steps the engine in the caller's thread, yielding after each step (the caller's code runs between
        steps), until every submitted request is done. A failed step ends every request (an error event),
        resets the engine and raises."""
        with self.cond:
            self._claim()
        try:
            while True:
                with self.cond:
                    if not (self.gone or self.engine.busy() or (self.pending and self.engine.free_slots())):
                        if self.pending:
                            raise RuntimeError(f"{len(self.pending)} requests wait for a slot and every slot is "
                                               "held: release a held slot first")
                        return
                try:
                    self._turn()
                except Exception as e:
                    self._end_all(f"generation failed ({type(e).__name__}: {str(e)[:200]})")
                    raise
                yield
        finally:
            with self.cond:
                self.stepping = False

    def shutdown(self, grace: float) -> None:
        """From now on new requests are refused (ShuttingDown) and waiting ones end; requests in a slot get
        `grace` seconds to finish, then end. Returns at once (`close` also waits for the thread)."""
        with self.cond:
            if not self.stopping:
                self.stopping, self.deadline = True, time.monotonic() + grace
            waiting, self.pending = list(self.pending), deque()
            self.admitted -= len(waiting)
            for t in waiting:
                t.finished = True
            self.cond.notify_all()
        for t in waiting:
            self._tell(t, Event.ended(t, "shutting down: the request was not started", shutdown=True))

    def close(self, timeout: float = 30.0) -> None:
        """Shuts down with no grace and waits up to `timeout` seconds for the thread to end."""
        self.shutdown(0)
        if self.thread is not None:
            self.thread.join(timeout)

    def _claim(self) -> None:
        if self.stepping:
            raise RuntimeError("the driver is already running (its thread, or a run in another thread)")
        self.stepping = True

    def _run(self, warmup: bool) -> None:
        what = "its warm-up failed"
        try:
            if warmup:
                self.warmup()
            what = "its thread failed"
            self._loop()
        except BaseException as e:  # noqa: BLE001 - told to everyone waiting, never a silent dead thread
            self._die(e, what)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.gone or self.stopping or self.engine.busy()
                           or (self.pending and self.engine.free_slots())):
                    self.cond.wait()
                if self.stopping and (not self.jobs or time.monotonic() >= self.deadline):
                    break
            try:
                self._turn()
            except Exception as e:  # noqa: BLE001 - a failed device call must not end the driver
                self._recover(e)
        with self.cond:
            left = list(self.jobs.values())
        for t in left:
            self.engine.cancel(t.slot)
            self._finish(t)
            self._tell(t, Event.ended(t, "shutting down: the audio was not finished in time", shutdown=True))
        with self.cond:
            self.stepping = False
            self.cond.notify_all()

    # ------------------------------------------------------------------------------------- one turn

    def _turn(self) -> None:
        """Cancels the requests whose owners went away, admits waiting ones into free slots, steps."""
        with self.cond:
            gone, self.gone = self.gone, []
            gone = [t for t in gone if t.slot is not None and self.jobs.get(t.slot) is t]
        for t in gone:
            self.engine.cancel(t.slot)
            self._finish(t)
        self._admit()
        if self.engine.busy():
            self._step()
        self._wake()  # whoever waits for a step (wait_prefilled)

    def _admit(self) -> None:
        with self.cond:
            while self.pending and not self.stopping:
                t = self.pending[0]
                slot = self.engine.insert(t, t.prompt)
                if slot is None:
                    return
                self.pending.popleft()
                t.slot, t.prompt, t.slotted = slot, None, time.monotonic()
                self.jobs[slot] = t

    def _step(self) -> None:
        """The one call of Engine.step: its events to their owners' sinks."""
        t0, events = time.perf_counter(), self.engine.step()
        self.on_step(time.perf_counter() - t0, events)
        for ev in events.values():
            t = ev.owner
            if ev.finished and not t.held:
                self._finish(t)  # before the sink hears it: its place is free when its owner knows it is done
            self._tell(t, ev)

    def _finish(self, t: Ticket) -> None:
        with self.cond:
            if t.finished:
                return
            t.finished = True
            if self.jobs.get(t.slot) is t:
                del self.jobs[t.slot]
            if t.counted:
                self.admitted -= 1

    def _tell(self, t: Ticket, ev: Event) -> None:
        try:
            t.sink(ev)
        except Exception:  # noqa: BLE001 - one owner's broken sink must not fail everyone's step
            log.exception("a sink failed on its event; the driver goes on")

    # ---------------------------------------------------------------------------- failure and warm-up

    def _end_all(self, message: str) -> None:
        """Every request (waiting or in a slot) and every holder is told `message`; the engine starts afresh."""
        with self.cond:
            waiting, self.pending = list(self.pending), deque()
            self.admitted -= len(waiting) + sum(t.counted for t in self.jobs.values())
            self.jobs, self.gone = {}, []
        told = waiting + self.engine.reset()
        for t in told:
            t.finished = not t.held
            self._tell(t, Event.ended(t, message))

    def _recover(self, error: Exception) -> None:
        log.error("engine step failed; ending every request and resetting the engine", exc_info=error)
        message = (f"the speech engine failed ({type(error).__name__}: {str(error)[:200]}); the request was "
                   f"dropped and the engine is being reset: retry shortly")
        with self.cond:
            self.failure, self.failures = message, self.failures + 1
        backoff = 0.5
        while True:
            try:
                self._end_all(message)  # fresh state; held conversations are told too
                probe = Ticket(PROBE, lambda ev: None, counted=False)
                self.engine.insert(probe, self.engine.prepare(PROBE))
                while self.engine.busy():  # one frame: dispatched, run and read back
                    self._step()
                break
            except Exception as e:  # noqa: BLE001 - still broken: keep refusing and try again later
                log.error("engine check after a failure failed; retrying in %.1f s", backoff, exc_info=e)
                with self.cond:
                    self.failure = f"{message} (the check after the reset failed: {e!s:.200})"
                    self.failures += 1
                    if self.stopping or self.cond.wait_for(lambda: self.stopping, backoff):
                        return
                backoff = min(2 * backoff, 30.0)
        with self.cond:
            self.failure, self.restarts = None, self.restarts + 1
            self.cond.notify_all()
        log.info("engine reset and checked; serving again")

    def warmup(self) -> int:
        """Compiles every program the engine can run (Engine.warmup), in the caller's thread; `warmup_progress`
        follows it. Returns the number of programs."""
        with self.cond:
            self.warming, self.warmup_progress = True, (0, self.engine.programs_to_compile())
        t0 = time.monotonic()

        def progress(compiled: int, total: int, what: str) -> None:
            with self.cond:
                self.warmup_progress = (compiled, total)
            log.info("warm-up: compiled %d/%d: %s", compiled, total, what)

        try:
            n = self.engine.warmup(progress)
        finally:
            with self.cond:
                self.warming = False
        log.info("warm-up: %d programs compiled in %.1f s", n, time.monotonic() - t0)
        return n

    def _die(self, error: BaseException, what: str) -> None:
        """The driver's thread ends for good: everyone waiting or in a slot is told, `on_fatal` is called."""
        log.error("the driver stopped: %s", what, exc_info=error)
        with self.cond:
            self.fatal, self.fatal_what, self.warming, self.stepping = error, what, False, False
            waiting, self.pending = list(self.pending), deque()
            self.admitted -= len(waiting) + len(self.jobs)
            waiting += list(self.jobs.values())
            self.jobs = {}
            self.cond.notify_all()
        for t in waiting:
            t.finished = True
            self._tell(t, Event.ended(t, self.stopped_because()))
        if self.on_fatal is not None:
            self.on_fatal(error)

    def stopped_because(self) -> str:
        """Why the driver's thread ended for good ("" while it has not)."""
        if self.fatal is None:
            return ""
        return f"the driver stopped: {self.fatal_what} ({type(self.fatal).__name__}: {self.fatal})"

    # ------------------------------------------------------------------------------------- reading

    def stats(self) -> dict:
        """Counts for /health and metrics: slots, requests, failures, restarts, prefill rows, deferrals, warm-up."""
        with self.cond:
            compiled, total = self.warmup_progress
            return {"slots": self.engine.slots, "busy_slots": len(self.jobs), "queued": len(self.pending),
                    "capacity": self.capacity, "engine_failures": self.failures, "engine_restarts": self.restarts,
                    "prefill_rows": self.engine.prefilled_rows, "deferred_admissions": self.engine.schedule.deferrals,
                    "warmup": {"programs": total, "compiled": compiled}}
