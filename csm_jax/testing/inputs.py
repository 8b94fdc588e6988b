"""Inputs for tests and benchmarks: speech-like audio, a random prompt of CSM rows, the tokenizer file.

numpy only: importable wherever csm_jax is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

TOKENIZER_ENV = "CSM_JAX_TEST_TOKENIZER"


def speech_like(n: int, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: gliding harmonics with syllable-rate amplitude changes, plus some noise."""
    g = np.random.default_rng(seed)
    t = np.arange(n) / 24000
    f0 = 120 + 60 * np.sin(2 * np.pi * 0.7 * t + g.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / 24000
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t + g.uniform(0, 6)) ** 2
    return (0.2 * voice * envelope + 0.02 * g.standard_normal(n)).astype(np.float32)


def random_prompt(batch: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The same prompt for `batch` rows: 64 random text tokens, 25 random audio frames and an end-of-audio row,
    as (tokens (batch, S, 33) int32, mask (batch, S, 33) bool, S = 90)."""
    rng = np.random.default_rng(0)
    n_text, n_audio = 64, 25
    S = n_text + n_audio + 1
    tokens = np.zeros((batch, S, 33), np.int32)
    mask = np.zeros((batch, S, 33), bool)
    tokens[:, :n_text, 32] = rng.integers(0, 128000, n_text)
    mask[:, :n_text, 32] = True
    tokens[:, n_text:n_text + n_audio, :32] = rng.integers(0, 2048, (n_audio, 32))
    mask[:, n_text:, :32] = True
    return tokens, mask, S


def tokenizer_file(path: str | None = None) -> str:
    """The Llama-3 tokenizer.json to use: `path` if given, else $CSM_JAX_TEST_TOKENIZER, else the copy that
    scripts/test.sh fetches into the checkout's .cache/llama3/."""
    if path:
        return path
    path = os.environ.get(TOKENIZER_ENV) or str(Path(__file__).resolve().parents[2] / ".cache" / "llama3" /
                                               "tokenizer.json")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Llama-3 tokenizer.json at {path}: set {TOKENIZER_ENV} to one (scripts/test.sh "
                                "fetches it into .cache/llama3/)")
    return path
