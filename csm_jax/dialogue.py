"""A conversation's CSM context kept in the backbone's KV cache, appended turn by turn.

    d = Dialogue(gen, voice=[Segment(1, "Transcript of the voice prompt.", audio=prompt_24k)])
    d.add(Segment(0, "what the user said", audio=user_24k))     # user's words and audio: rows appended
    for chunk in d.speak("A sentence of the reply."):           # generated as speaker 1, streamed
        play(chunk)                                              # the reply's frames stay in the cache

The cache holds exactly the rows Sesame's generator would build from the whole history (text rows, audio
rows, and the all-zero end-of-audio row of every segment), but each turn only appends its own rows:
nothing is prefilled twice while the history fits. The voice prompt is pinned at the front.

Positions beyond the trained 2048 are never used. When a new turn (plus the reply it reserves room for)
would pass position 2048, the oldest non-pinned segments leave and the cache is rebuilt by one prefill of
what remains (voice prompt first, at position 0), so every position stays inside the range the model was
trained on and the rows keep the order and relative positions they had. A rebuild costs one prefill of at
most 2048 rows; it happens once per that many rows of conversation, not per turn. A user turn that alone
cannot fit keeps its most recent audio frames.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from csm_jax import csm
from csm_jax.generate import FRAME_MS, Generator, stream_decode
from csm_jax.mimi import init_decoder_state
from csm_jax.text import Segment, audio_rows, segment_rows, text_rows


def codes_digest(codes: np.ndarray) -> str:
    """A short fingerprint of Mimi codes (32, T), for logs that show which audio is in the context."""
    return hashlib.sha1(np.ascontiguousarray(codes, np.int32).tobytes()).hexdigest()[:16]


@dataclass
class ContextEntry:
    segment: Segment  # with codes (32, T) when it has audio
    rows: int


class Dialogue:
    """One conversation's backbone state (batch 1) and the segments it holds, oldest first."""

    def __init__(self, gen: Generator, voice: list[Segment] | None = None):
        self.gen, self.cfg, self.params = gen, gen.cfg, gen.params
        self.capacity = self.cfg.max_seq_len
        self.pinned = [self._entry(s) for s in gen.context_codes(voice or [])]
        if sum(e.rows for e in self.pinned) >= self.capacity // 2:
            raise ValueError(f"the voice prompt takes {sum(e.rows for e in self.pinned)} of the model's "
                             f"{self.capacity} positions; use a shorter clip (10 s or less is plenty)")
        self.history: list[ContextEntry] = []
        self.state = csm.GenState.create(self.cfg, 1, self.params["c0_head"].dtype)
        self.pos = 0
        self.rebuilds = 0  # times the cache was rebuilt because the history outgrew it
        self.dropped = 0  # history segments that left the context
        self.appended_rows = 0  # rows appended by turns (rebuilds not counted)
        self._rebuild()

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
        return ContextEntry(seg, len(segment_rows(self.gen.tokenizer, seg)[0]))

    def _prefill(self, tokens: np.ndarray, mask: np.ndarray) -> None:
        n = len(tokens)
        if n == 0:
            return
        if self.pos + n > self.capacity:
            raise AssertionError("the caller makes room first")
        for t, m, lengths, window in csm.prefill_pieces(self.cfg, tokens[None], mask[None], [n], self.pos):
            self.state = csm.prefill(self.params, self.cfg, self.state, t, m, lengths, jnp.ones(1, bool), window)
        self.pos += n

    def _rebuild(self) -> None:
        """Empties the cache and prefills the pinned prompt and the kept history from position 0."""
        self.state = csm.reset_rows(self.state, jnp.ones(1, bool))
        self.pos = 0
        parts = [segment_rows(self.gen.tokenizer, e.segment) for e in self.pinned + self.history]
        if parts:
            self._prefill(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def _make_room(self, needed: int) -> None:
        """Ensures `needed` more rows fit below the capacity, dropping the oldest history and rebuilding."""
        if self.pos + needed <= self.capacity:
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
        A turn too long to fit even alone keeps its most recent frames. Returns the segment as stored."""
        seg = self.gen.context_codes([segment])[0]
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
        self._prefill(*segment_rows(self.gen.tokenizer, seg))
        self.appended_rows += entry.rows
        self.history.append(entry)
        return seg

    def speak(self, text: str, speaker: int = 1, seed: int = 0, temperature: float = 0.9, topk: int = 50,
              max_audio_ms: int = 10_000, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        """Generates `text` in the conversation's context and streams 24 kHz audio chunks. The frames made
        (all of them, or those made before `cancel` was set or the consumer stopped) stay in the cache
        as this speaker's segment, closed by the end-of-audio row."""
        if not max_audio_ms or max_audio_ms < FRAME_MS:
            raise ValueError(f"max_audio_ms must be at least {FRAME_MS} (one frame), got {max_audio_ms}")
        max_frames = int(max_audio_ms // FRAME_MS)
        tokens, mask = text_rows(self.gen.tokenizer.segment_ids(speaker, text))
        self._make_room(len(tokens) + max_frames + 1)
        self._prefill(tokens, mask)
        self.appended_rows += len(tokens)
        self.state = csm.set_sampling(self.state, jnp.ones(1, bool), jnp.array([temperature], jnp.float32),
                                      jnp.array([topk], jnp.int32), jnp.array([seed], jnp.int32),
                                      jnp.array([max_frames], jnp.int32))
        mimi, K = self.gen.mimi, self.gen.frames_per_call
        dec = init_decoder_state(mimi, 1)
        made: list[np.ndarray] = []
        try:
            while not bool(self.state.done[0]) and not (cancel is not None and cancel.is_set()):
                self.state, frames, valid = csm.generate_frames(
                    self.params, self.cfg, self.state, K, csm.attention_window(self.cfg, self.pos + K))
                frames = np.asarray(frames)[0][np.asarray(valid)[0]]
                self.pos += len(frames)
                made.extend(frames)
                dec, audio = stream_decode(mimi, dec, frames)
                if audio.size:
                    yield audio
        finally:
            codes = np.stack(made, 1).astype(np.int32) if made else np.zeros((32, 0), np.int32)
            end_t, end_m = audio_rows(codes[:, :0])  # the end-of-audio row only: the frames are in already
            self._prefill(end_t, end_m)
            self.appended_rows += len(made) + 1
            self.history.append(self._entry(Segment(speaker, text, None, codes)))
