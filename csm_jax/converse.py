"""Talk to CSM: speech in -> voice activity -> speech recognition -> any LLM -> CSM speech out.

    conv = Conversation(Dialogue(gen, voice), ChatClient("http://localhost:11434/v1", "llama3.2"),
                        Transcriber("tiny.en"))
    log = conv.turn(user_audio, 16000, on_audio=play)      # one user turn -> the spoken reply, streamed

Each user turn goes into CSM's context as speaker 0 with its own audio (Mimi codes) and transcript, and
each spoken reply sentence as speaker 1 with the codes CSM made, so the reply's prosody follows the
dialogue; the context lives in the KV cache and is only appended to (csm_jax.dialogue). The LLM's reply
is streamed and cut at sentence ends; each sentence is spoken while the LLM writes the next one.

Parts, each usable alone:
  VoiceActivity   silero-vad's ONNX model (the `silero_vad` package's bundled file) on onnxruntime
  TurnDetector    streaming end-of-turn detection over VoiceActivity (speech start, then enough silence)
  Transcriber     faster-whisper (a model name such as "tiny.en", or a local CTranslate2 folder)
  ChatClient      OpenAI-compatible /chat/completions with streamed text (Ollama, llama.cpp, vLLM, OpenAI)
  SentenceCutter  incremental sentence boundaries over streamed text
"""

from __future__ import annotations

import json
import os
import queue
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from csm_jax.audio import SAMPLE_RATE, check_audio
from csm_jax.dialogue import Dialogue, codes_digest
from csm_jax.text import FRAME_SAMPLES, Segment

VAD_RATE = 16_000
SYSTEM_PROMPT = ("You are a friendly voice assistant in a spoken conversation. Answer in one to three short "
                 "sentences of plain spoken English: no lists, no markdown, no emoji, no stage directions.")


def resample(audio: np.ndarray, sr: int, target: int) -> np.ndarray:
    import soxr

    audio = np.asarray(audio, np.float32)
    return audio if sr == target else soxr.resample(audio, sr, target, "HQ").astype(np.float32)


# ---------------------------------------------------------------------------------------- voice activity


def default_vad_model() -> Path:
    try:
        from importlib.resources import files

        path = Path(str(files("silero_vad") / "data" / "silero_vad.onnx"))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError("silero-vad's model file was not found: `pip install --no-deps silero-vad` "
                                "(the package carries silero_vad.onnx; --no-deps skips its torch requirement), "
                                "or pass the path of a silero_vad.onnx")
    return path


class VoiceActivity:
    """Silero VAD: speech probability per 32 ms window of 16 kHz audio (512 samples plus 64 of context)."""

    WINDOW, CONTEXT = 512, 64

    def __init__(self, model_path: str | Path | None = None):
        try:
            import onnxruntime
        except ImportError as e:
            raise ImportError("voice activity detection needs onnxruntime: pip install onnxruntime") from e
        path = Path(model_path) if model_path else default_vad_model()
        if not path.is_file():
            raise FileNotFoundError(f"VAD model not found: {path}")
        opts = onnxruntime.SessionOptions()
        opts.inter_op_num_threads = opts.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), sess_options=opts,
                                                    providers=["CPUExecutionProvider"])
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(self.CONTEXT, np.float32)

    def window(self, samples: np.ndarray) -> float:
        """Speech probability of the next 512 samples (16 kHz) of a stream."""
        x = np.concatenate([self._context, samples.astype(np.float32)])[None]
        prob, self._state = self.session.run(None, {"input": x, "state": self._state,
                                                    "sr": np.array(VAD_RATE, np.int64)})
        self._context = x[0, -self.CONTEXT:]
        return float(prob[0, 0])


@dataclass
class TurnEvent:
    kind: str  # "speech_start" or "turn_end"
    audio: np.ndarray | None = None  # the turn's audio (at the detector's input rate) for "turn_end"


class TurnDetector:
    """Streaming end of turn: speech starts after `min_speech_ms` above `threshold`; the turn ends after
    `min_silence_ms` below `threshold - 0.15`. Feed audio at `sample_rate` in chunks of any size."""

    def __init__(self, vad: VoiceActivity, sample_rate: int = VAD_RATE, threshold: float = 0.5,
                 min_speech_ms: int = 160, min_silence_ms: int = 600, pad_ms: int = 200,
                 max_turn_s: float = 60.0):
        self.vad, self.sr, self.threshold = vad, sample_rate, threshold
        win_ms = 1000 * VoiceActivity.WINDOW / VAD_RATE
        self.min_speech, self.min_silence = int(np.ceil(min_speech_ms / win_ms)), int(np.ceil(min_silence_ms / win_ms))
        self.pad = int(pad_ms * sample_rate / 1000)
        self.max_turn = int(max_turn_s * sample_rate)
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self._raw: list[np.ndarray] = []  # input-rate audio since the last turn (bounded by pad when idle)
        self._raw_n = 0
        self._pending16 = np.zeros(0, np.float32)
        self._in16 = 0  # 16 kHz samples consumed so far (since reset)
        self._start_in = 0  # input-rate sample index of _raw[0]
        self.speaking = False
        self._run = 0  # consecutive windows above (idle) or below (speaking) the threshold
        self._speech_start = 0

    def _buffer(self) -> np.ndarray:
        return np.concatenate(self._raw) if self._raw else np.zeros(0, np.float32)

    def feed(self, audio: np.ndarray) -> list[TurnEvent]:
        audio = np.asarray(audio, np.float32)
        self._raw.append(audio)
        self._raw_n += audio.size
        self._pending16 = np.concatenate([self._pending16, resample(audio, self.sr, VAD_RATE)])
        events = []
        W = VoiceActivity.WINDOW
        while self._pending16.size >= W:
            p = self.vad.window(self._pending16[:W])
            self._pending16 = self._pending16[W:]
            self._in16 += W
            at = int(self._in16 * self.sr / VAD_RATE)  # input-rate index of this window's end
            if not self.speaking:
                self._run = self._run + 1 if p >= self.threshold else 0
                if self._run >= self.min_speech:
                    self.speaking, self._run = True, 0
                    self._speech_start = max(at - int(self.min_speech * W * self.sr / VAD_RATE) - self.pad, 0)
                    events.append(TurnEvent("speech_start"))
            else:
                self._run = self._run + 1 if p < self.threshold - 0.15 else 0
                if self._run >= self.min_silence or at - self._speech_start >= self.max_turn:
                    end = at - int(self._run * W * self.sr / VAD_RATE) + self.pad
                    events.append(TurnEvent("turn_end", self._cut(self._speech_start, end)))
                    self.speaking, self._run = False, 0
        if not self.speaking:  # idle: keep only the padding before a possible speech start
            self._trim(self._raw_n + self._start_in - self.pad - int(self.min_speech * W * self.sr / VAD_RATE) - W)
        return events

    def flush(self) -> np.ndarray | None:
        """Ends the current turn now (push-to-talk release, end of file): its audio, or None without speech."""
        if not self.speaking:
            return None
        audio = self._cut(self._speech_start, self._start_in + self._raw_n)
        self.speaking, self._run = False, 0
        return audio

    def _cut(self, start: int, end: int) -> np.ndarray:
        buf = self._buffer()
        s, e = max(start - self._start_in, 0), max(min(end - self._start_in, buf.size), 0)
        audio = buf[s:e].copy()
        self._trim(end)
        return audio

    def _trim(self, before: int) -> None:
        drop = before - self._start_in
        if drop <= 0:
            return
        buf = self._buffer()[drop:]
        self._raw, self._raw_n, self._start_in = [buf], buf.size, self._start_in + drop


# ------------------------------------------------------------------------------------ speech recognition


class Transcriber:
    """faster-whisper speech recognition: a model name (e.g. "tiny.en", fetched from the hub on first use)
    or a local CTranslate2 model folder."""

    def __init__(self, model: str = "tiny.en", device: str = "cpu", compute_type: str = "int8",
                 language: str | None = None, beam_size: int = 1):
        try:
            from faster_whisper import WhisperModel
        except ImportError as e:
            raise ImportError("speech recognition needs faster-whisper: pip install faster-whisper") from e
        if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
            raise FileNotFoundError(f"ASR model folder not found: {model} (give a folder or a model name "
                                    "such as tiny.en)")
        model = str(Path(model).expanduser()) if model.startswith("~") else model
        self.model = WhisperModel(model, device=device, compute_type=compute_type)
        self.language = language or ("en" if model.endswith(".en") else None)
        self.beam_size = beam_size

    def __call__(self, audio: np.ndarray, sample_rate: int = VAD_RATE) -> str:
        audio = resample(check_audio(audio, "speech"), sample_rate, VAD_RATE)
        segments, _ = self.model.transcribe(audio, language=self.language, beam_size=self.beam_size,
                                            condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments if s.no_speech_prob < 0.8).strip()


# ------------------------------------------------------------------------------------------------- LLM


class LLMError(RuntimeError):
    """The LLM endpoint failed; the message says how (and the conversation goes on)."""


class ChatClient:
    """An OpenAI-compatible chat-completions client with streamed text.

    base_url: e.g. http://localhost:11434/v1 (Ollama), http://localhost:8080/v1 (llama.cpp server),
    https://api.openai.com/v1. The API key is read from the environment variable `api_key_env`."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 system_prompt: str = SYSTEM_PROMPT, max_tokens: int = 200, temperature: float = 0.7,
                 timeout_s: float = 30.0):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.system_prompt = model, system_prompt
        self.max_tokens, self.temperature, self.timeout_s = max_tokens, temperature, timeout_s
        key = os.environ.get(api_key_env, "")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)))

    def stream(self, history: list[dict], stop: threading.Event | None = None) -> Iterator[str]:
        """Text deltas of the reply to `history` (a list of {"role", "content"}), as they arrive."""
        import httpx

        body = {"model": self.model, "stream": True, "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                "messages": [{"role": "system", "content": self.system_prompt}, *history]}
        try:
            with self.http.stream("POST", self.url, json=body, headers=self.headers) as r:
                if r.status_code >= 400:
                    detail = r.read().decode(errors="replace")[:300]
                    raise LLMError(f"the LLM at {self.url} answered {r.status_code}: {detail}")
                for line in r.iter_lines():
                    if stop is not None and stop.is_set():
                        return
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        msg = json.loads(data)
                    except ValueError as e:
                        raise LLMError(f"the LLM at {self.url} sent a malformed stream line: {data[:120]}") from e
                    if "error" in msg:
                        raise LLMError(f"the LLM at {self.url} failed: {msg['error']}")
                    for choice in msg.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.ConnectError as e:
            raise LLMError(f"cannot reach the LLM at {self.url} ({e}); start it or pass the right --llm-url") from e
        except httpx.TimeoutException as e:
            raise LLMError(f"the LLM at {self.url} did not answer within {self.timeout_s:g} s; "
                           "it may be overloaded or loading a model: try again, or raise --llm-timeout") from e
        except httpx.HTTPError as e:
            raise LLMError(f"the connection to the LLM at {self.url} failed: {e}") from e


_CLEAN = [(re.compile(r"[*_`#>]+"), ""), (re.compile(r"\s+"), " ")]
_END = re.compile(r"[.!?…](?:[\"'”’)\]]*)(?=\s)|\n\s*\n")


class SentenceCutter:
    """Cuts streamed text into sentences: a sentence ends at . ! ? … (and closing quotes) followed by white
    space, or at a blank line; one longer than `max_chars` is cut at its last comma or space."""

    def __init__(self, max_chars: int = 250, min_chars: int = 2):
        self.buf, self.max_chars, self.min_chars = "", max_chars, min_chars

    def feed(self, delta: str) -> list[str]:
        self.buf += delta
        out = []
        while True:
            m = _END.search(self.buf)
            if m is None or m.end() > self.max_chars:
                if len(self.buf) <= self.max_chars:
                    break
                cut = max(self.buf.rfind(", ", 0, self.max_chars), self.buf.rfind(" ", 0, self.max_chars))
                cut = cut + 1 if cut > 0 else self.max_chars
            else:
                cut = m.end()
            s, self.buf = _clean(self.buf[:cut]), self.buf[cut:]
            if len(s) >= self.min_chars:
                out.append(s)
        return out

    def flush(self) -> list[str]:
        s, self.buf = _clean(self.buf), ""
        return [s] if len(s) >= self.min_chars and re.search(r"\w", s) else []


def _clean(s: str) -> str:
    for pat, rep in _CLEAN:
        s = pat.sub(rep, s)
    return s.strip()


# -------------------------------------------------------------------------------------------- dialogue


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
    """A spoken conversation: chat history for the LLM and CSM context (`dialogue`) for the voice."""

    def __init__(self, dialogue: Dialogue, llm: ChatClient, asr: Transcriber | None = None,
                 seed: int = 0, temperature: float = 0.9, topk: int = 50, max_sentence_ms: int = 10_000,
                 user_speaker: int = 0, reply_speaker: int = 1, max_user_text_chars: int = 2000,
                 max_history_messages: int = 40):
        self.dialogue, self.llm, self.asr = dialogue, llm, asr
        self.seed, self.temperature, self.topk, self.max_sentence_ms = seed, temperature, topk, max_sentence_ms
        self.user_speaker, self.reply_speaker = user_speaker, reply_speaker
        if user_speaker == reply_speaker:
            raise ValueError(f"the user and the assistant need different CSM speaker ids (both {user_speaker})")
        self.max_user_text_chars, self.max_history_messages = max_user_text_chars, max_history_messages
        self.history: list[dict] = []  # the chat sent to the LLM: the latest max_history_messages messages
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
        audio24k = resample(audio, sample_rate, SAMPLE_RATE)
        whole = -(-audio24k.size // FRAME_SAMPLES) * FRAME_SAMPLES  # end on a whole frame of (silent) padding
        audio24k = np.pad(audio24k, (0, whole - audio24k.size))
        log = self.respond(text, audio24k, on_audio, on_text, cancel, t0)
        log.latency["asr_s"] = round(asr_s, 4)
        return log

    def respond(self, text: str, audio24k: np.ndarray | None = None,
                on_audio: Callable[[np.ndarray], None] = lambda a: None,
                on_text: Callable[[str, str], None] = lambda kind, text: None,
                cancel: threading.Event | None = None, t0: float | None = None) -> TurnLog:
        """The reply to a user turn given as text (and optionally its 24 kHz audio, for CSM's context)."""
        t0 = time.monotonic() if t0 is None else t0
        text = text.strip()[: self.max_user_text_chars]
        d = self.dialogue
        self.turns += 1
        log = TurnLog(self.turns, text, context_rows_before=d.pos)
        rebuilds, dropped, appended = d.rebuilds, d.dropped, d.appended_rows
        cancel = cancel or threading.Event()

        # The LLM streams in a thread; sentences arrive on a queue while CSM works on the previous one.
        sentences: queue.Queue = queue.Queue()
        messages = [*self.history, {"role": "user", "content": text}]

        def llm_worker():
            cutter = SentenceCutter()
            try:
                for delta in self.llm.stream(messages, cancel):
                    for s in cutter.feed(delta):
                        sentences.put((s, time.monotonic()))
                for s in cutter.flush():
                    sentences.put((s, time.monotonic()))
                sentences.put(None)
            except Exception as e:  # noqa: BLE001 - reported as the turn's error
                sentences.put(e)

        threading.Thread(target=llm_worker, daemon=True, name="llm-stream").start()

        # The user's turn enters CSM's context while the LLM thinks.
        reserve = int(self.max_sentence_ms // 80) + 64
        user = d.add(Segment(self.user_speaker, text, audio=None if audio24k is None else check_audio(audio24k)),
                     reserve=reserve)
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
        if log.sentences:  # the LLM's history holds what was actually said
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": log.reply_text}]
            self.history = self.history[-self.max_history_messages:]
        log.audio_seconds = round(samples / SAMPLE_RATE, 3)
        log.context_rows, log.appended_rows = d.pos, d.appended_rows - appended
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
        """Stops the reply in progress and the worker; safe to call twice."""
        self.closed.set()
        self.cancel.set()
        self.turns.put(None)
        if threading.current_thread() is not self.worker:
            self.worker.join(timeout)

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


class Serialized:
    """Calls through to `fn` one caller at a time (a speech recognizer shared by conversations)."""

    def __init__(self, fn):
        self.fn, self.lock = fn, threading.Lock()

    def __call__(self, *args):
        with self.lock:
            return self.fn(*args)


@dataclass
class ConverseOptions:
    """The conversation settings shared by scripts/converse.py and scripts/serve.py."""

    llm_url: str = "http://localhost:11434/v1"
    """OpenAI-compatible base URL (Ollama's default here; llama.cpp server: http://localhost:8080/v1)."""
    llm_model: str = "llama3.2"
    """Model name the LLM server knows."""
    llm_api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (unset: no key sent)."""
    llm_timeout: float = 30.0
    """Seconds to wait for the LLM before the turn fails (the conversation goes on)."""
    llm_max_tokens: int = 200
    """Cap on the reply's length in tokens."""
    system_prompt: str = SYSTEM_PROMPT
    """What the LLM is told to be (short spoken-style answers by default)."""
    asr_model: str = "tiny.en"
    """faster-whisper model: a name (tiny.en, base.en, small, ...) or a local CTranslate2 folder."""
    asr_device: str = "cpu"
    """faster-whisper device: cpu, cuda or auto."""
    asr_compute_type: str = "int8"
    """CTranslate2 compute type: int8, float16, float32, ..."""
    vad_model: str | None = None
    """silero_vad.onnx (default: the one in the silero-vad package)."""
    vad_threshold: float = 0.5
    """Speech probability above which a 32 ms window counts as speech."""
    end_of_turn_ms: int = 600
    """Silence that ends the user's turn."""
    voice: str | None = None
    """Audio of the assistant's voice prompt (kept pinned in CSM's context)."""
    voice_text: str | None = None
    """Transcript of --voice (or a path to a .txt holding it)."""
    voice_speaker: int = 1
    """CSM speaker id of the assistant (and of its voice prompt); the user is 0, or 1 when this is 0."""
    seed: int = 0
    """CSM sampling seed (each reply sentence derives its own from it)."""
    temperature: float = 0.9
    """CSM sampling temperature (0 = greedy)."""
    topk: int = 50
    max_sentence_ms: int = 10_000
    """Cap on the audio of one reply sentence."""

    def voice_segments(self) -> list[Segment]:
        if self.voice is None:
            if self.voice_text:
                raise ValueError("--voice-text was given without --voice (the audio it transcribes)")
            return []
        from csm_jax.audio import load_audio

        if not self.voice_text:
            raise ValueError("--voice needs --voice-text: the words spoken in the voice prompt")
        text = self.voice_text
        if text.endswith(".txt"):
            if not Path(text).is_file():
                raise FileNotFoundError(f"voice transcript not found: {text}")
            text = Path(text).read_text(encoding="utf-8").strip()
        return [Segment(self.voice_speaker, text, audio=load_audio(self.voice))]

    def factory(self, gen) -> Callable[[int], tuple[Conversation, TurnDetector]]:
        """Loads the shared parts once (ASR, VAD model, voice prompt codes) and returns
        `sample_rate -> (Conversation, TurnDetector)` making one fresh conversation per call."""
        voice = gen.context_codes(self.voice_segments())
        asr = Serialized(Transcriber(self.asr_model, self.asr_device, self.asr_compute_type))
        self.detector(VAD_RATE)  # a missing VAD model fails at start-up, not at the first connection

        def make(sample_rate: int):
            llm = ChatClient(self.llm_url, self.llm_model, self.llm_api_key_env, self.system_prompt,
                             self.llm_max_tokens, timeout_s=self.llm_timeout)
            conv = Conversation(Dialogue(gen, voice), llm, asr, self.seed, self.temperature, self.topk,
                                self.max_sentence_ms, user_speaker=0 if self.voice_speaker != 0 else 1,
                                reply_speaker=self.voice_speaker)
            return conv, self.detector(sample_rate)

        return make

    def detector(self, sample_rate: int) -> TurnDetector:
        return TurnDetector(VoiceActivity(self.vad_model), sample_rate, self.vad_threshold,
                            min_silence_ms=self.end_of_turn_ms)
