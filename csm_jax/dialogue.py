"""A conversation's CSM context kept in an engine slot's KV cache, appended turn by turn.

    with gen.driver(slots=8) as driver:                         # shared with requests and other conversations
        d = Dialogue(driver, voice=[Segment(1, "Transcript of the voice prompt.", audio=prompt_24k)])
        d.add(Segment(0, "what the user said", audio=user_24k))  # user's words and audio: rows appended
        for chunk in d.speak("A sentence of the reply."):        # generated as speaker 1, streamed
            play(chunk)                                           # the reply's frames stay in the cache
        d.close()                                                 # frees the slot

A dialogue holds one engine slot for its whole life (csm_jax.driver `hold`), so many conversations share the
device's batch with plain requests. The slot's cache holds exactly the rows Sesame's generator would build
from the whole history (text rows, audio rows, and the all-zero end-of-audio row of every segment), but each
turn only appends its own rows: nothing is prefilled twice while the history fits. The voice prompt is pinned
at the front. Rows go to the engine's queue (`extend`) and its steps prefill them as its schedule allows, so a
long turn never stalls the other streams for its whole prefill.

Positions beyond the trained 2048 are never used. When a new turn (plus the reply it reserves room for)
would pass position 2048, the oldest non-pinned segments leave and the slot is rebuilt by one prefill of
what remains (voice prompt first, at position 0), so every position stays inside the range the model was
trained on and the rows keep the order and relative positions they had. A rebuild costs a prefill of at
most 2048 rows (queued like a turn's rows, so spread over steps); it happens once per that many rows of
conversation, not per turn. A user turn that alone cannot fit keeps its most recent audio frames.

A dialogue never steps the engine: the driver's thread does, and the dialogue waits for its events on its
own queue. `add` returns once the turn is in the cache; a reply's text rows are queued and it starts as soon
as they are in. Without a running driver thread, the first wait raises instead of waiting forever.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from csm_jax.driver import Driver
from csm_jax.request import Event, check_sampling, check_seed, frames_for
from csm_jax.text import Segment, audio_rows, segment_rows, text_rows


def codes_digest(codes: np.ndarray) -> str:
    """A short fingerprint of Mimi codes (32, T), for logs that show which audio is in the context."""
    return hashlib.sha1(np.ascontiguousarray(codes, np.int32).tobytes()).hexdigest()[:16]


@dataclass
class ContextEntry:
    segment: Segment  # with codes (32, T) when it has audio
    rows: int


class Dialogue:
    """One conversation's slot in an engine and the segments its cache holds, oldest first."""

    def __init__(self, driver: Driver, voice: list[Segment] | None = None):
        """`driver`: a running driver (its thread steps the engine) whose engine holds the slot."""
        self.driver, self.model = driver, driver.engine.model
        self.capacity = self.model.cfg.max_seq_len
        self.pinned = [self._entry(s) for s in self.model.context_codes(voice or [])]
        if sum(e.rows for e in self.pinned) >= self.capacity // 2:
            raise ValueError(f"prompt too long: the voice prompt (pinned context) takes "
                             f"{sum(e.rows for e in self.pinned)} of the model's {self.capacity} positions; use a "
                             "shorter clip (10 s or less is plenty)")
        self.history: list[ContextEntry] = []
        self.events: queue.Queue[Event] = queue.Queue()
        self.slot: int | None = None
        self.closed = False
        self.rows = 0  # rows in the slot's cache, queued ones included: the next row's position
        self.rebuilds = 0  # times the cache was rebuilt because the history outgrew it
        self.dropped = 0  # history segments that left the context
        self.appended_rows = 0  # rows appended by turns (rebuilds not counted)
        self._slot()

    def close(self) -> None:
        """Frees the slot (the conversation is over)."""
        self.closed = True
        if self.slot is not None:
            self.driver.release(self.slot)
            self.slot = None

    # ------------------------------------------------------------------------------------------- state

    @property
    def segments(self) -> list[Segment]:
        """Everything the cache holds, in order: the pinned voice prompt, then the history."""
        return [e.segment for e in self.pinned + self.history]

    def describe(self) -> list[dict]:
        """The context as a list of {speaker, text, frames, codes_sha1}, for logs and inspection."""
        out = []
        for e in self.pinned + self.history:
            s = e.segment
            out.append({"speaker": s.speaker, "text": s.text, "rows": e.rows,
                        "frames": 0 if s.codes is None else int(s.codes.shape[1]),
                        "codes_sha1": None if s.codes is None else codes_digest(s.codes)})
        return out

    def _entry(self, seg: Segment) -> ContextEntry:
        return ContextEntry(seg, len(segment_rows(self.model.tokenizer, seg)[0]))

    def _slot(self) -> int:
        """The held slot; a new one, rebuilt from the segments, if the engine lost it (a failed step)."""
        if self.closed:
            raise RuntimeError("this dialogue is closed")
        if self.slot is not None and self.driver.holder(self.slot) is not self:
            self.slot = None  # the engine failed a step and started afresh
        if self.slot is None:
            self.events = queue.Queue()
            slot = self.driver.hold(self, self.events.put)
            if slot is None:
                raise RuntimeError(f"all {self.driver.engine.slots} engine slots are in use; try again when one is "
                                   "free")
            self.slot = slot
            self._rebuild()
        return self.slot

    def _prefill(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        """Queues rows for the slot (the driver's steps prefill them, in order)."""
        if self.rows + len(tokens) > self.capacity:
            raise AssertionError("the caller makes room first")
        self.driver.extend(self._slot(), tokens, mask)
        self.rows += len(tokens)

    def _rebuild(self) -> None:
        """Empties the cache and prefills the pinned prompt and the kept history from position 0."""
        self.driver.clear(self._slot())
        self.rows = 0
        parts = [segment_rows(self.model.tokenizer, e.segment) for e in self.pinned + self.history]
        if parts:
            self._prefill(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def _make_room(self, needed: int) -> None:
        """Ensures `needed` more rows fit below the capacity, dropping the oldest history and rebuilding."""
        if self.rows + needed <= self.capacity:
            return
        base = sum(e.rows for e in self.pinned)
        if base + needed > self.capacity:
            raise ValueError(f"a turn needing {needed} positions cannot fit beside the {base}-row voice prompt "
                             f"in the model's {self.capacity} positions; lower max_audio_ms or shorten the text")
        while self.history and base + sum(e.rows for e in self.history) + needed > self.capacity:
            self.history.pop(0)
            self.dropped += 1
        self.rebuilds += 1
        self._rebuild()

    # ----------------------------------------------------------------------------------------- turns

    def add(self, segment: Segment, reserve: int = 0) -> Segment:
        """Appends a finished turn (its audio Mimi-encoded here when given as audio). `reserve`: rows to keep
        free after it (the reply about to be generated), so the reply does not force a second rebuild.
        A turn too long to fit even alone keeps its most recent frames. Returns (once the turn's rows are in
        the cache) the segment as stored."""
        seg = self.model.context_codes([segment])[0]
        entry = self._entry(seg)
        room = self.capacity - sum(e.rows for e in self.pinned) - reserve
        if entry.rows > room and seg.codes is not None:
            text_n = entry.rows - seg.codes.shape[1] - 1
            keep = room - text_n - 1
            if keep < 1:
                raise ValueError(f"the turn's text alone takes {text_n} positions; it cannot fit in the model's "
                                 f"{self.capacity} positions with the voice prompt and the reply")
            seg = Segment(seg.speaker, seg.text, None, seg.codes[:, -keep:])
            entry = self._entry(seg)
        self._make_room(entry.rows + reserve)
        self._prefill(*segment_rows(self.model.tokenizer, seg))
        self.appended_rows += entry.rows
        self.history.append(entry)
        self.driver.wait_prefilled(self._slot())
        return seg

    def speak(self, text: str, speaker: int = 1, seed: int = 0, temperature: float = 0.9, topk: int = 50,
              max_audio_ms: int = 10_000, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        """Generates `text` in the conversation's context and streams 24 kHz audio chunks. The frames heard
        (all of them, or those yielded before `cancel` was set or the consumer stopped: frames made meanwhile
        are taken back out of the cache) stay in the cache as this speaker's segment, closed by the
        end-of-audio row."""
        max_frames = frames_for(max_audio_ms)
        check_seed(seed)
        check_sampling(temperature, topk)  # before the text's rows go in: a refused reply leaves no trace
        tokens, mask = text_rows(self.model.tokenizer.segment_ids(speaker, text))
        self._make_room(len(tokens) + max_frames + 1)
        self._prefill(tokens, mask)
        self.appended_rows += len(tokens)
        slot = self._slot()
        self.driver.start(slot, seed, temperature, topk, max_frames)
        made: list[np.ndarray] = []  # the frames heard: yielded to the consumer
        extra = 0  # frames made after the reply was stopped (the step under way), never heard
        finished = stopped = False
        error = None
        try:
            while not finished:
                if cancel is not None and cancel.is_set() and not stopped:
                    self.driver.stop(slot)
                    stopped = True
                ev = self._next_event()
                finished, error = ev.finished, ev.error
                if error is not None:
                    # The engine started afresh: this slot is gone. The next turn holds a new one and
                    # rebuilds the context (without this reply).
                    self.slot = None
                    self.rows -= len(tokens)
                    raise RuntimeError(f"generation failed: {error}")
                if stopped:
                    extra += len(ev.codes)
                    continue
                made.append(ev.codes)
                if ev.audio.size:
                    yield ev.audio
        finally:
            if not finished:  # the consumer stopped early: end the reply, keep what was heard
                self.driver.stop(slot)
                while not finished:
                    ev = self._next_event()
                    extra += len(ev.codes)
                    finished, error = ev.finished, ev.error
            if error is None:
                if extra:
                    self.driver.rewind(slot, extra)
                codes = np.concatenate(made).T.astype(np.int32) if made else np.zeros((32, 0), np.int32)
                self.rows += codes.shape[1]
                end_t, end_m = audio_rows(codes[:, :0])  # the end-of-audio row only: the frames are in already
                self._prefill(end_t, end_m)
                self.appended_rows += codes.shape[1] + 1
                self.history.append(self._entry(Segment(speaker, text, None, codes)))

    def _next_event(self) -> Event:
        """This slot's next event, made by the driver's thread."""
        while True:
            try:
                return self.events.get(timeout=0.25)
            except queue.Empty:
                self.driver.check_running()
