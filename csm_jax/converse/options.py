"""ConverseOptions: the conversation settings scripts/converse.py and scripts/serve.py share, and the factory
that loads the shared parts once and makes one fresh conversation per call."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from csm_jax.converse.asr import Transcriber
from csm_jax.converse.llm import SYSTEM_PROMPT, ChatClient
from csm_jax.converse.session import Conversation
from csm_jax.converse.vad import MAX_TURN_S, VAD_RATE, TurnDetector, VoiceActivity
from csm_jax.dialogue import Dialogue
from csm_jax.driver import Driver
from csm_jax.text import Segment


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

    def check(self) -> None:
        """Refuses, naming the flag, settings no conversation could run with (before anything loads)."""
        from csm_jax.request import check_seed, check_temperature, check_topk, frames_for
        from csm_jax.text import check_speaker

        checks = [("--seed", check_seed, self.seed), ("--temperature", check_temperature, self.temperature),
                  ("--topk", check_topk, self.topk), ("--max-sentence-ms", frames_for, self.max_sentence_ms),
                  ("--voice-speaker", check_speaker, self.voice_speaker)]
        for flag, check, value in checks:
            try:
                check(value)
            except ValueError as e:
                raise ValueError(f"{flag} {value}: {e}") from None
        for flag, value in (("--llm-timeout", self.llm_timeout), ("--llm-max-tokens", self.llm_max_tokens),
                            ("--end-of-turn-ms", self.end_of_turn_ms)):
            if not value > 0:
                raise ValueError(f"{flag} {value}: give a number above 0")
        if not 0 < self.vad_threshold < 1:
            raise ValueError(f"--vad-threshold {self.vad_threshold}: give a speech probability between 0 and 1")

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

    def factory(self, driver: Driver, warmup: bool = False, progress: Callable[[str], None] | None = None
                ) -> Callable[[int], tuple[Conversation, TurnDetector]]:
        """Loads the shared parts once (ASR, VAD model, voice prompt codes) and returns
        `sample_rate -> (Conversation, TurnDetector)` making one fresh conversation per call, each holding a
        slot of `driver`'s engine (csm_jax.driver; its thread runs while they talk) until it is closed.
        `warmup`: also compile the Mimi encoder for every turn length (buckets up to MAX_TURN_S), so a user's
        turn never waits for a compilation."""
        model = driver.engine.model
        # The parts that can be missing (faster-whisper, the VAD model) first: the warm-up below takes minutes.
        asr = Serialized(Transcriber(self.asr_model, self.asr_device, self.asr_compute_type))
        self.detector(VAD_RATE)  # a missing VAD model fails at start-up, not at the first connection
        voice = model.context_codes(self.voice_segments())
        if warmup:
            model.warm_encoder(MAX_TURN_S, progress)

        def make(sample_rate: int):
            llm = ChatClient(self.llm_url, self.llm_model, self.llm_api_key_env, self.system_prompt,
                             self.llm_max_tokens, timeout_s=self.llm_timeout)
            conv = Conversation(Dialogue(driver, voice), llm, asr, self.seed, self.temperature, self.topk,
                                self.max_sentence_ms, user_speaker=0 if self.voice_speaker != 0 else 1,
                                reply_speaker=self.voice_speaker)
            return conv, self.detector(sample_rate)

        return make

    def detector(self, sample_rate: int) -> TurnDetector:
        return TurnDetector(VoiceActivity(self.vad_model), sample_rate, self.vad_threshold,
                            min_silence_ms=self.end_of_turn_ms)
