"""Speech recognition: faster-whisper (a model name such as "tiny.en", or a local CTranslate2 folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from csm_jax.audio import check_audio, resample
from csm_jax.converse.vad import VAD_RATE


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
        try:
            self.model = WhisperModel(model, device=device, compute_type=compute_type)
        except Exception as e:  # noqa: BLE001 - the hub, CTranslate2 and the files each raise their own
            why = (str(e).strip().splitlines() or [""])[0]
            where = (f"from {model} (give a folder holding a CTranslate2 Whisper model: model.bin, config.json, ...)"
                     if Path(model).is_dir() else
                     f"'{model}' from the Hugging Face hub (offline, it must be in the local cache; or give a local "
                     "CTranslate2 model folder)")
            raise ValueError(f"cannot load the speech recognizer {where}: {type(e).__name__}: {why}") from e
        self.language = language or ("en" if model.endswith(".en") else None)
        self.beam_size = beam_size

    def __call__(self, audio: np.ndarray, sample_rate: int = VAD_RATE) -> str:
        audio = resample(check_audio(audio, "speech"), sample_rate, VAD_RATE)
        segments, _ = self.model.transcribe(audio, language=self.language, beam_size=self.beam_size,
                                            condition_on_previous_text=False, vad_filter=False)
        return " ".join(s.text.strip() for s in segments if s.no_speech_prob < 0.8).strip()
