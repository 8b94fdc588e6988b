"""A spoken conversation's turns: Conversation (one user turn -> ASR -> LLM -> CSM's spoken reply, with the
context in CSM's KV cache), LiveSession (turn detection, a worker thread and barge-in over a microphone
stream) and TurnLog (one turn, as the JSON-lines transcript holds it)."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

from csm_jax.audio import SAMPLE_RATE, check_audio, resample, whole_frames
from csm_jax.converse.asr import Transcriber
from csm_jax.converse.llm import ChatClient, without_markdown
from csm_jax.converse.vad import TurnDetector
from csm_jax.dialogue import Dialogue, codes_digest
from csm_jax.text import Segment, SentenceCutter


@dataclass
class TurnLog:
    """One turn, as written to the JSON-lines transcript. Latencies are seconds from the end of the user's
    turn (the moment VAD or push-to-talk ended it)."""

    turn: int
    user_text: str
    reply_text: str = ""
    sentences: list[str] = field(default_factory=list)
    audio_seconds: float = 0.0
    context_rows_before: int = 0  # rows in the CSM cache when the turn began
    context_rows: int = 0  # rows in the cache after the reply
    appended_rows: int = 0  # rows this turn appended (user turn + reply)
    rebuilt: bool = False  # the history outgrew the cache: oldest turns left, the rest was re-prefilled
    dropped_segments: int = 0
    user_frames: int = 0
    user_codes_sha1: str | None = None
    context: list[dict] = field(default_factory=list)  # the CSM context the reply was spoken in
    latency: dict = field(default_factory=dict)  # asr_s, context_s, llm_first_sentence_s, first_audio_s, total_s
    interrupted: bool = False
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class Conversation:
    """A spoken conversation: chat messages for the LLM and CSM context (`dialogue`) for the voice."""

    def __init__(self, dialogue: Dialogue, llm: ChatClient, asr: Transcriber | None = None,
                 seed: int = 0, temperature: float = 0.9, topk: int = 50, max_sentence_ms: int = 10_000,
                 user_speaker: int = 0, reply_speaker: int = 1, max_user_text_chars: int = 2000,
                 max_messages: int = 40):
        self.dialogue, self.llm, self.asr = dialogue, llm, asr
        self.seed, self.temperature, self.topk, self.max_sentence_ms = seed, temperature, topk, max_sentence_ms
        self.user_speaker, self.reply_speaker = user_speaker, reply_speaker
        if user_speaker == reply_speaker:
            raise ValueError(f"the user and the assistant need different CSM speaker ids (both {user_speaker})")
        self.max_user_text_chars, self.max_messages = max_user_text_chars, max_messages
        self.messages: list[dict] = []  # the chat sent to the LLM: its latest max_messages messages
        self.turns = 0

    def turn(self, audio: np.ndarray, sample_rate: int, on_audio: Callable[[np.ndarray], None] = lambda a: None,
             on_text: Callable[[str, str], None] = lambda kind, text: None,
             cancel: threading.Event | None = None, t_end: float | None = None) -> TurnLog | None:
        """One user turn (audio at `sample_rate`) -> the reply, streamed to `on_audio` (24 kHz chunks).
        Returns None when the speech recognizer heard no words (no turn happens)."""
        t0 = time.monotonic() if t_end is None else t_end
        if self.asr is None:
            raise ValueError("this conversation has no speech recognizer; use respond() with text")
        text = self.asr(audio, sample_rate)
        asr_s = time.monotonic() - t0
        if not re.search(r"\w", text):
            return None
        on_text("user", text)
        log = self.respond(text, resample(audio, sample_rate, SAMPLE_RATE), on_audio, on_text, cancel, t0)
        log.latency["asr_s"] = round(asr_s, 4)
        return log

    def respond(self, text: str, audio24k: np.ndarray | None = None,
                on_audio: Callable[[np.ndarray], None] = lambda a: None,
                on_text: Callable[[str, str], None] = lambda kind, text: None,
                cancel: threading.Event | None = None, t0: float | None = None) -> TurnLog:
        """The reply to a user turn given as text (and optionally its 24 kHz audio, for CSM's context; it enters
        the context ending on a whole Mimi frame, closed with silence)."""
        t0 = time.monotonic() if t0 is None else t0
        text = text.strip()[: self.max_user_text_chars]
        d = self.dialogue
        self.turns += 1
        log = TurnLog(self.turns, text, context_rows_before=d.rows)
        rebuilds, dropped, appended = d.rebuilds, d.dropped, d.appended_rows
        cancel = cancel or threading.Event()

        # The LLM streams in a thread; sentences arrive on a queue while CSM works on the previous one.
        sentences: queue.Queue = queue.Queue()
        chat = [*self.messages, {"role": "user", "content": text}]

        def llm_worker():
            cutter = SentenceCutter()
            try:
                for delta in self.llm.stream(chat, cancel):
                    for s in cutter.feed(without_markdown(delta)):
                        sentences.put((s, time.monotonic()))
                for s in cutter.flush():
                    sentences.put((s, time.monotonic()))
                sentences.put(None)
            except Exception as e:  # noqa: BLE001 - reported as the turn's error
                sentences.put(e)

        threading.Thread(target=llm_worker, daemon=True, name="llm-stream").start()

        # The user's turn enters CSM's context while the LLM thinks.
        reserve = int(self.max_sentence_ms // 80) + 64
        # Whole frames (a few milliseconds of silence at the end): the Mimi encoder then runs a program compiled
        # for its length bucket at warm-up, not a new compilation for this turn's exact length.
        audio = None if audio24k is None else whole_frames(check_audio(audio24k))
        user = d.add(Segment(self.user_speaker, text, audio=audio), reserve=reserve)
        log.latency["context_s"] = round(time.monotonic() - t0, 4)
        if user.codes is not None:
            log.user_frames, log.user_codes_sha1 = int(user.codes.shape[1]), codes_digest(user.codes)

        samples = 0
        while not cancel.is_set():
            try:
                item = sentences.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                break
            if isinstance(item, Exception):
                log.error = str(item)
                on_text("error", log.error)
                break
            item, t_sentence = item
            if "llm_first_sentence_s" not in log.latency:
                log.latency["llm_first_sentence_s"] = round(t_sentence - t0, 4)
                log.context = d.describe()
            on_text("reply", item)
            log.sentences.append(item)
            for chunk in d.speak(item, self.reply_speaker, self.seed + len(log.sentences) + 1000 * self.turns,
                                 self.temperature, self.topk, self.max_sentence_ms, cancel):
                if "first_audio_s" not in log.latency:
                    log.latency["first_audio_s"] = round(time.monotonic() - t0, 4)
                samples += chunk.size
                on_audio(chunk)
        log.interrupted = cancel.is_set()
        log.reply_text = " ".join(log.sentences)
        if log.sentences:  # the LLM's chat holds what was actually said
            self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": log.reply_text}]
            self.messages = self.messages[-self.max_messages:]
        log.audio_seconds = round(samples / SAMPLE_RATE, 3)
        log.context_rows, log.appended_rows = d.rows, d.appended_rows - appended
        log.rebuilt, log.dropped_segments = d.rebuilds > rebuilds, d.dropped - dropped
        log.latency["total_s"] = round(time.monotonic() - t0, 4)
        return log


class LiveSession:
    """A live conversation over a stream of microphone audio: turn detection, one turn at a time on a worker
    thread, and barge-in (speech during a reply stops it, and the new words become the next turn).

    `emit(kind, value)` is called from the worker (and the feeding) thread with: ("speech_start", None),
    ("user", text), ("reply", sentence), ("audio", 24 kHz chunk), ("turn", TurnLog), ("no_words", None),
    ("barge_in", None), ("error", message). Audio is fed at `sample_rate` with `feed`; `end_turn` ends the
    current turn at once (push to talk)."""

    def __init__(self, conv: Conversation, detector: TurnDetector, emit: Callable[[str, object], None],
                 on_turn_done: Callable[[TurnLog | None], None] = lambda log: None):
        self.conv, self.detector, self.emit, self.on_turn_done = conv, detector, emit, on_turn_done
        self.turns: queue.Queue = queue.Queue()
        self.cancel = threading.Event()  # set to stop the reply in progress
        self.replying = threading.Event()
        self.closed = threading.Event()
        self.worker = threading.Thread(target=self._run, daemon=True, name="conversation")
        self.worker.start()

    def feed(self, audio: np.ndarray) -> None:
        for ev in self.detector.feed(audio):
            self._event(ev.kind, ev.audio)

    def end_turn(self) -> None:
        audio = self.detector.flush()
        if audio is not None:
            self._event("turn_end", audio)
        else:  # the button was released but no speech was heard
            self.emit("no_words", None)

    def _event(self, kind: str, audio) -> None:
        if kind == "speech_start":
            if self.replying.is_set():
                self.cancel.set()
                self.emit("barge_in", None)
            self.emit("speech_start", None)
        elif kind == "turn_end":
            self.turns.put((audio, time.monotonic()))

    def close(self, timeout: float | None = 30.0) -> None:
        """Stops the reply in progress and the worker, and frees the conversation's engine slot; safe to call
        twice."""
        self.closed.set()
        self.cancel.set()
        self.turns.put(None)
        if threading.current_thread() is not self.worker:
            self.worker.join(timeout)
            if not self.worker.is_alive():
                self.conv.dialogue.close()
        else:
            self.conv.dialogue.close()

    def _run(self) -> None:
        while not self.closed.is_set():
            item = self.turns.get()
            if item is None:
                return
            audio, t_end = item
            self.cancel = threading.Event()
            self.replying.set()
            log = None
            try:
                log = self.conv.turn(audio, self.detector.sr, lambda a: self.emit("audio", a), self.emit,
                                     self.cancel, t_end)
                if log is None:
                    self.emit("no_words", None)
                else:
                    self.emit("turn", log)
            except Exception as e:  # noqa: BLE001 - the conversation survives a failed turn
                self.emit("error", f"{type(e).__name__}: {e}")
            finally:
                self.replying.clear()
                self.on_turn_done(log)
