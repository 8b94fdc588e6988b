"""Named voices: `voices_dir/NAME.wav` (any format soundfile reads) with `NAME.txt` (its transcript) and
optionally `NAME.json` (`{"speaker": 1}`; speaker 0 otherwise), Mimi-encoded once at start-up and given to CSM
as context, so `voice="NAME"` speaks in that voice."""

from __future__ import annotations

import json
from pathlib import Path

from csm_jax.bundle import ModelBundle
from csm_jax.text import Segment, check_speaker


def read_voices(folder: str | Path | None) -> dict[str, Segment]:
    """{name: its segment, with audio} for every voice in `folder` (none when it is None): everything that can
    be wrong with the folder is found here, before a model is needed. ValueError or FileNotFoundError naming
    the voice's file and what it should hold."""
    if folder is None:
        return {}
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"voices folder not found: {folder}" if not folder.exists() else
                                f"voices folder {folder} is a file: give a folder of NAME.wav + NAME.txt pairs")
    from csm_jax.audio import load_audio

    voices = {}
    for txt in sorted(folder.glob("*.txt")):
        name = txt.stem
        audio_files = [p for p in folder.glob(f"{name}.*") if p.suffix.lower() not in (".txt", ".json")]
        if not audio_files:
            raise FileNotFoundError(f"voice '{name}': {txt} has no audio file beside it ({name}.wav)")
        transcript = txt.read_text(encoding="utf-8").strip()
        if not transcript:
            raise ValueError(f"voice '{name}': {txt} is empty: write the words spoken in {audio_files[0].name}")
        meta_file = folder / f"{name}.json"
        speaker = 0
        if meta_file.exists():
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
                speaker = check_speaker(meta.get("speaker", 0) if isinstance(meta, dict) else None)
            except ValueError as e:  # invalid JSON, or not {"speaker": N}
                raise ValueError(f"voice '{name}': {meta_file} must be like {{\"speaker\": 1}} ({e})") from None
        voices[name] = Segment(speaker, transcript, audio=load_audio(audio_files[0]))
    return voices


def load_voices(folder: str | Path | dict[str, Segment] | None, model: ModelBundle) -> dict[str, list[Segment]]:
    """{name: [its segment, with codes]} for every voice in `folder` (or of `read_voices(folder)` already
    read; none when it is None)."""
    voices = folder if isinstance(folder, dict) else read_voices(folder)
    return {name: model.context_codes([seg]) for name, seg in voices.items()}
