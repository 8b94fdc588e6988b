"""Voice activity and turn detection: silero-vad's ONNX model on onnxruntime, and streaming end of turn.

    detector = TurnDetector(VoiceActivity(), sample_rate=48000)
    for event in detector.feed(chunk):          # chunks of any size, as a microphone delivers them
        ...                                     # TurnEvent("speech_start") / TurnEvent("turn_end", audio)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_jax.audio import resample

VAD_RATE = 16_000


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


MAX_TURN_S = 60.0  # a turn longer than this ends there (and its audio is at most this long)


class TurnDetector:
    """Streaming end of turn: speech starts after `min_speech_ms` above `threshold`; the turn ends after
    `min_silence_ms` below `threshold - 0.15`. Feed audio at `sample_rate` in chunks of any size."""

    def __init__(self, vad: VoiceActivity, sample_rate: int = VAD_RATE, threshold: float = 0.5,
                 min_speech_ms: int = 160, min_silence_ms: int = 600, pad_ms: int = 200,
                 max_turn_s: float = MAX_TURN_S):
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
