"""What goes into the engine and what comes out: a Request (one utterance to speak in a fresh slot), an Event
(what one step made for one slot), and the checks every entry point shares (seeds, sampling, audio caps).

    Request("Hello there.", speaker=1, seed=3, max_audio_ms=2000)
    Event(owner, audio, pcm16, codes, finished)   # audio: new 24 kHz samples (and as int16); codes: (frames, 32)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from csm_jax.audio import FRAME_MS
from csm_jax.text import Segment

MAX_SEED = 2**32 - 1  # seeds key a uint32 PRNG stream
MAX_TOPK = 2048  # Mimi's codebook size: CSM's codes 2048-2050 are never sampled, so a larger k changes nothing


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def check_temperature(temperature) -> float:
    """A finite number, 0 (greedy) or more: the sampler itself would read a negative one as greedy."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
            or not 0 <= temperature < float("inf"):
        raise ValueError(f"temperature must be a number, 0 (greedy) or more, got {temperature!r}")
    return float(temperature)


def check_topk(topk) -> int:
    """An integer from 1 to MAX_TOPK: the sampler itself would clip it."""
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be an integer from 1 to {MAX_TOPK}, got {topk!r}")
    return int(topk)


def check_sampling(temperature, topk) -> tuple[float, int]:
    return check_temperature(temperature), check_topk(topk)


def frames_for(max_audio_ms) -> int:
    """Frames in `max_audio_ms` of audio (80 ms each); at least one."""
    if isinstance(max_audio_ms, bool) or not isinstance(max_audio_ms, (int, float, np.integer)) \
            or not max_audio_ms >= FRAME_MS:
        raise ValueError(f"max_audio_ms must be at least {FRAME_MS} (one frame), got {max_audio_ms!r}")
    return int(max_audio_ms // FRAME_MS)


@dataclass
class Request:
    """One utterance to speak in a fresh slot: its text after `context` (earlier turns, a voice prompt)."""

    text: str
    speaker: int = 0
    context: list[Segment] = field(default_factory=list)
    seed: int = 0
    temperature: float = 0.9
    topk: int = 50
    max_audio_ms: int = 10_000
    drop_oldest: bool = False  # drop the oldest context segments when the prompt would not fit


@dataclass
class Event:
    """What one step made for one slot, or how its work ended without finishing. The engine's `audio` and
    `pcm16` are views of the step's PCM for every slot (one host buffer each): whoever keeps them while the
    engine goes on serving other slots copies them, else they keep the whole step's buffer alive (the server
    takes copies of the pcm16 bytes)."""

    owner: object  # whoever the engine was given the work by (csm_jax.driver: a Ticket)
    audio: np.ndarray  # new 24 kHz samples (possibly empty), float32
    pcm16: np.ndarray  # the same samples as 16-bit PCM (audio.pcm16), int16
    codes: np.ndarray  # the new frames' codes (frames, 32)
    finished: bool
    error: str | None = None  # the work ended without finishing, and why (then finished is True)
    shutdown: bool = False  # ... because the driver stopped, not because anything failed

    @staticmethod
    def ended(owner, error: str, shutdown: bool = False) -> "Event":
        """The last event of work that could not finish: no audio, finished, with the reason."""
        return Event(owner, np.zeros(0, np.float32), np.zeros(0, np.int16), np.zeros((0, 32), np.int32), True,
                     error, shutdown)
