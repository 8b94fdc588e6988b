"""Which waiting requests the engine prefills at a step: new requests' first audio soon, running streams on time.

    sched = Scheduler(max_rows=1024)
    chosen = sched.admit(now, [(slot, rows_left), ...])   # oldest first -> [(slot, rows to prefill now), ...]
    groups = sched.groups([rows for _, rows in chosen])   # -> [(indices into chosen, padded rows), ...]
    sched.delivered(slot, now, seconds)                   # audio handed to a stream's client
    sched.finished(slot)                                  # the stream made its last frame
    sched.step_done(now, cost, measured)                  # a step ended: the step-time estimates learn from it

    queue = PrefillQueue()                                # the prompts waiting for their rows to be prefilled
    queue.add(slot, tokens, mask, sampling, fresh=True)
    chosen = sched.admit(now, [(p.slot, p.left) for p in queue.waiting()])

A stream's client plays its audio in real time from its first audio (after `start_buffer_s`), so a stream has
`slack`: its audio delivered minus the time played since, the time it can wait for its next audio before its
playback stalls. The engine's next step delivers the next audio after about one generation step plus the prefill
dispatched with it, so:

  - A prompt is prefilled across steps when it is longer than a step's rows: each step gives a prompt at most
    the step's row cap (whole `row_step`-row pieces) and the rest waits for the next steps, so one long voice
    prompt never stalls the running streams for its whole prefill. The queue (`PrefillQueue.waiting`) lists
    partly prefilled prompts first (oldest first), then new ones: what was started is finished first.
  - When every running stream's slack covers the next step plus the prefill, the waiting prompts are admitted
    at once, oldest first, as many as `max_rows` padded rows hold (and always the oldest one; `max_count`
    requests at most when given): a new request's first audio comes first.
  - Otherwise only as many rows as the smallest slack leaves room for are prefilled this step (the oldest
    prompt's next rows and those after it that fit; none when not even one `row_step` piece fits): running
    streams keep ahead of their playback.
  - Unless generation itself is slower than real time (a step takes longer than the audio it makes,
    `step_audio_s`): then no deferral keeps the streams on time, and waiting requests go in at once.
  - Starvation either way is bounded: the oldest waiting prompt gets rows after at most `max_defer` steps
    that passed it over, whatever the slack; running streams generate at every step, and a step never prefills
    more than `max_rows` padded rows (one `row_step` piece when `max_rows` is smaller).

The prompts admitted at a step are prefilled in groups (`groups`), one per length class: the prompts whose
rows this step fill the same power of two of `row_step`-row pieces (up to 32 rows, 64, 128, 256, ...), each
padded to the longest of its class, rounded up to `row_step`. A step's prefill then computes (`cost`), per
class, its count times its padded length: similar lengths waste little padding, and a prompt never waits for
another class. The engine runs each group as programs of 64, 8 or single requests (csm_jax.programs), so no
request is ever padded in.

Step times are estimated from the wall time between the ends of consecutive pipelined steps (moving averages):
a step ends when the previous step's results are on the host, so the time between two ends is one generation
step plus the prefill dispatched with the earlier one. Steps without a prefill measure the generation step,
those with one the seconds per prefilled row. Everything here is plain Python on numbers given to it (the clock
included): no device, no threads.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np


def bucket(n: int, lo: int = 1) -> int:
    """The smallest power of two >= n (and >= lo): padded sizes keep the number of compiled programs small."""
    return max(lo, 1 << max(n - 1, 0).bit_length())


class Scheduler:
    """Per-step admission of waiting prefills against the running streams' playback deadlines."""

    def __init__(self, max_count: int | None = None, max_rows: int = 1024, row_step: int = 32, max_defer: int = 4,
                 start_buffer_s: float = 0.0, step_audio_s: float | None = None, smoothing: float = 0.25):
        """`max_count`: requests prefilled at one step at most (None: as many as the rows allow); `max_rows`:
        padded prompt rows per step at most (longer prompts are prefilled across steps); `row_step`: prompts
        are padded to a multiple of it (csm.PREFILL_STEP); `max_defer`: steps the oldest waiting request may be
        passed over for the running streams' sake; `start_buffer_s`: audio a client buffers before it starts
        playing (0: playback starts with the first audio, the strictest assumption); `step_audio_s`: seconds of
        audio a step makes per stream (None: unknown, streams are always protected); `smoothing`: weight of a
        new step-time measurement in the moving averages."""
        if (max_count is not None and max_count < 1) or max_rows < 1 or row_step < 1 or max_defer < 0 \
                or not 0 < smoothing <= 1:
            raise ValueError("the scheduler needs max_count (or None), max_rows and row_step >= 1, max_defer >= 0 "
                             "and 0 < smoothing <= 1")
        self.max_count, self.max_rows, self.row_step = max_count, max_rows, row_step
        self.max_defer, self.start_buffer_s, self.smoothing = max_defer, start_buffer_s, smoothing
        self.step_audio_s = step_audio_s
        self.step_s: float | None = None  # a generation step without prefill, seconds
        self.row_s: float | None = None  # a prefilled (padded) row, seconds
        self.deferrals = 0  # steps that passed the oldest waiting request over, since the start
        self.reset()

    def reset(self) -> None:
        """No streams and nothing waiting (the engine started afresh); the step-time estimates are kept."""
        self.streams: dict[Hashable, list[float]] = {}  # key -> [time of its first audio, seconds delivered]
        self.head: Hashable | None = None  # the oldest waiting request at the last `admit`
        self.passed = 0  # steps that passed `head` over
        self._last_end: float | None = None
        self._last_cost = 0

    # ------------------------------------------------------------------------------------------ streams

    def delivered(self, key: Hashable, now: float, seconds: float) -> None:
        """`seconds` of audio of stream `key` went to its client at `now` (its first audio starts its clock)."""
        if seconds <= 0 and key not in self.streams:
            return
        self.streams.setdefault(key, [now, 0.0])[1] += seconds

    def finished(self, key: Hashable) -> None:
        """The stream made its last audio (or was cancelled): it no longer constrains admission."""
        self.streams.pop(key, None)

    def slack(self, now: float) -> float | None:
        """The smallest slack of the running streams at `now`, seconds (negative: its playback has stalled);
        None when no stream has audio yet."""
        if not self.streams:
            return None
        return min(first + self.start_buffer_s + sent - now for first, sent in self.streams.values())

    # ----------------------------------------------------------------------------------------- admission

    def padded(self, rows: int) -> int:
        """`rows` rounded up to whole `row_step` pieces."""
        return -(-rows // self.row_step) * self.row_step

    def length_class(self, rows: int) -> int:
        """The power of two of `row_step` pieces that holds `rows` rows (1, 2, 4, 8, ...)."""
        return bucket(-(-rows // self.row_step))

    def groups(self, rows: Sequence[int]) -> list[tuple[list[int], int]]:
        """Prompts prefilling `rows` rows each at one step, by length class (in order of first appearance):
        [(their indices in `rows`, the rows each is padded to: the class's longest, padded), ...]."""
        classes: dict[int, list[int]] = {}
        for i, n in enumerate(rows):
            classes.setdefault(self.length_class(n), []).append(i)
        return [(idx, self.padded(max(rows[i] for i in idx))) for idx in classes.values()]

    def cost(self, rows: Sequence[int]) -> int:
        """Rows a step's prefill of prompts of `rows` rows computes: per length class, count x padded length."""
        return sum(len(idx) * length for idx, length in self.groups(rows))

    def budget(self, now: float) -> float:
        """Padded prompt rows the running streams' slack allows this step (at most `max_rows`)."""
        slack = self.slack(now)
        if slack is None or self.overloaded():
            return self.max_rows
        spare = slack - (self.step_s or 0.0)
        if spare <= 0:
            return 0
        if not self.row_s:
            return self.max_rows
        return min(self.max_rows, spare / self.row_s)

    def overloaded(self) -> bool:
        """Generation is slower than real time: no admission order can keep the streams on time."""
        return self.step_audio_s is not None and self.step_s is not None and self.step_s >= self.step_audio_s

    def admit(self, now: float, waiting: Sequence[tuple[Hashable, int]]) -> list[tuple[Hashable, int]]:
        """Which of `waiting` ((key, prompt rows still to prefill), oldest first; the engine puts partly
        prefilled prompts first) to prefill at the step starting at `now`, and how many of their rows:
        [(key, rows this step), ...] in their order in `waiting`; [] defers them all this step. A prompt longer
        than the step's rows gets a multiple of `row_step` rows now and the rest at later steps."""
        if not waiting:
            self.head, self.passed = None, 0
            return []
        if waiting[0][0] != self.head:
            self.head, self.passed = waiting[0][0], 0
        budget = self.budget(now)
        cap = self.max_rows if self.passed >= self.max_defer or budget >= self.max_rows else budget
        # Rows one prompt may prefill this step: whole pieces of `row_step` rows within the cap (at least one
        # piece when the head is forced in or the cap allows one).
        per = max(int(cap) // self.row_step * self.row_step, self.row_step if cap >= self.max_rows else 0)
        if per == 0:
            self.passed += 1
            self.deferrals += 1
            return []
        self.head, self.passed = None, 0
        rows = [(key, min(n, per)) for key, n in waiting]
        return [rows[i] for i in self._fill([n for _, n in rows], cap)]

    def _fill(self, rows: Sequence[int], cap: float) -> list[int]:
        """The first prompt, then each later one (oldest first) whose rows keep the step's cost within `cap`
        (a longer prompt may raise its class's padded length), up to `max_count`."""
        classes: dict[int, tuple[int, int]] = {}  # length class -> (prompts, padded length)
        chosen, total = [], 0
        for i, n in enumerate(rows):
            if self.max_count is not None and len(chosen) == self.max_count:
                break
            c = self.length_class(n)
            count, length = classes.get(c, (0, 0))
            grown = max(length, self.padded(n))
            extra = (count + 1) * grown - count * length
            if chosen and total + extra > cap:
                continue
            classes[c] = (count + 1, grown)
            total += extra
            chosen.append(i)
        return chosen

    # ---------------------------------------------------------------------------------------- step times

    def step_done(self, now: float, cost: int, measured: bool) -> None:
        """A step ended at `now` (its previous step's results on the host), having dispatched a prefill of `cost`
        padded rows (0: none). `measured`: the step before it had dispatched work too, so the time since that
        one ended is one pipelined step (not an idle wait)."""
        if measured and self._last_end is not None:
            dt, a = now - self._last_end, self.smoothing
            if self._last_cost == 0:
                self.step_s = dt if self.step_s is None else (1 - a) * self.step_s + a * dt
            elif self.step_s is not None:
                per_row = max(dt - self.step_s, 0.0) / self._last_cost
                self.row_s = per_row if self.row_s is None else (1 - a) * self.row_s + a * per_row
        self._last_end, self._last_cost = now, cost


# ------------------------------------------------------------------------------------------- the queue


@dataclass
class Prefill:
    """Prompt rows waiting to be prefilled into a slot, across as many steps as the schedule takes."""

    slot: int
    tokens: np.ndarray  # (S, 33): rows [prefilled:] are still to prefill
    mask: np.ndarray
    sampling: tuple | None  # (temperature, topk, seed, max_frames): generate when the rows are in (None: don't)
    fresh: bool  # a request's slot: emptied before its first rows
    prefilled: int = 0  # rows prefilled so far
    stopped: bool = False  # a held slot's reply stopped before it started: it starts finished

    @property
    def left(self) -> int:
        return len(self.tokens) - self.prefilled


class PrefillQueue:
    """The prompts waiting to be prefilled, one per slot, in arrival order; `waiting` gives the admission order."""

    def __init__(self):
        self.items: list[Prefill] = []

    def __bool__(self) -> bool:
        return bool(self.items)

    def add(self, slot: int, tokens: np.ndarray, mask: np.ndarray, sampling: tuple | None, fresh: bool) -> None:
        """Queues a slot's prompt (it has none queued)."""
        self.items.append(Prefill(slot, np.asarray(tokens), np.asarray(mask), sampling, fresh))

    def append(self, slot: int, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Appends rows after those the slot has queued (a new entry, not fresh, when it has none)."""
        waiting = self.of(slot)
        if waiting is None:
            self.add(slot, tokens, mask, None, fresh=False)
        else:
            waiting.tokens = np.concatenate([waiting.tokens, tokens])
            waiting.mask = np.concatenate([waiting.mask, mask])

    def of(self, slot: int) -> Prefill | None:
        return next((p for p in self.items if p.slot == slot), None)

    def drop(self, slot: int) -> None:
        self.items = [p for p in self.items if p.slot != slot]

    def rows_left(self, slot: int) -> int:
        p = self.of(slot)
        return 0 if p is None else p.left

    def waiting(self) -> list[Prefill]:
        """The admission order: partly prefilled prompts first (oldest first), then new ones (oldest first)."""
        return [p for p in self.items if p.prefilled] + [p for p in self.items if not p.prefilled]

    def advance(self, taken: Sequence[tuple[Prefill, int]]) -> list[Prefill]:
        """`taken` ((prompt, rows prefilled this step), ...) went in: the prompts now complete leave the queue
        and are returned, in the order of `taken`."""
        for p, rows in taken:
            p.prefilled += rows
        complete = [p for p, _ in taken if not p.left]
        self.items = [p for p in self.items if p.left]
        return complete
