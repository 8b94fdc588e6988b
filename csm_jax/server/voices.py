"""Named voices: `voices_dir/NAME.wav` (any format soundfile reads) with `NAME.txt` (its transcript) and
optionally `NAME.json` (`{"speaker": 1}`; speaker 0 otherwise), Mimi-encoded once at start-up and given to CSM
as context, so `voice="NAME"` speaks in that voice."""

from __future__ import annotations

import json
from pathlib import Path

from csm_jax.bundle import ModelBundle
from csm_jax.text import Segment


def load_voices(folder: str | Path | None, model: ModelBundle) -> dict[str, list[Segment]]:
    """{name: [its segment, with codes]} for every voice in `folder` (none when it is None)."""
    voices: dict[str, list[Segment]] = {}
    if folder is None:
        return voices
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"voices folder not found: {folder}")
    from csm_jax.audio import load_audio

    for txt in sorted(folder.glob("*.txt")):
        name = txt.stem
        audio_files = [p for p in folder.glob(f"{name}.*") if p.suffix.lower() not in (".txt", ".json")]
        if not audio_files:
            raise FileNotFoundError(f"voice '{name}': {txt} has no audio file beside it ({name}.wav)")
        meta = json.loads((folder / f"{name}.json").read_text()) if (folder / f"{name}.json").exists() else {}
        seg = Segment(int(meta.get("speaker", 0)), txt.read_text().strip(), audio=load_audio(audio_files[0]))
        voices[name] = model.context_codes([seg])
    return voices
