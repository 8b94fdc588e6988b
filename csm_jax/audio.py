"""Audio in and out: any file soundfile reads -> mono float32 at 24 kHz, and atomic WAV/FLAC writing.

Resampling uses soxr (libsoxr's "HQ" quality), never a hand-written filter.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 24_000
FRAME_MS = 80  # one Mimi frame (12.5 frames a second)
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 1920 samples per frame


def check_audio(audio: np.ndarray, what: str = "audio") -> np.ndarray:
    """Validates a mono waveform (L,) and returns it as float32; raises ValueError on empty/NaN/inf."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"{what}: expected a mono waveform of shape (samples,), got shape {audio.shape}; "
                         "use csm_jax.audio.to_mono to mix channels down first")
    if audio.size == 0:
        raise ValueError(f"{what}: the audio is empty (0 samples); give at least one sample")
    if not np.issubdtype(audio.dtype, np.floating):
        if np.issubdtype(audio.dtype, np.integer):
            audio = audio.astype(np.float32) / float(np.iinfo(audio.dtype).max)
        else:
            raise ValueError(f"{what}: unsupported sample dtype {audio.dtype}; give float or integer PCM")
    audio = audio.astype(np.float32, copy=False)
    bad = ~np.isfinite(audio)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"{what}: contains {int(bad.sum())} NaN or infinite samples (first at sample {first}, "
                         f"{first / SAMPLE_RATE:.3f} s at 24 kHz); clean the signal before encoding")
    return audio


def whole_frames(audio: np.ndarray, frame: int = FRAME_SAMPLES) -> np.ndarray:
    """`audio` (L,) with trailing silence up to a whole number of 80 ms Mimi frames (1920 samples at 24 kHz).
    Mimi encodes whole frames through programs compiled once per length bucket; a partial last frame needs a
    program of its own length (Mimi pads it inside its convolutions), so recordings of any length, such as a
    conversation's turns, go through this first."""
    pad = -audio.size % frame
    return audio if pad == 0 else np.concatenate([audio, np.zeros(pad, audio.dtype)])


def pcm16(audio):
    """Float samples as 16-bit PCM (int16): clipped to [-1, 1], times 32767, truncated toward zero; NaN gives 0.
    One formula for NumPy and JAX arrays alike: the generation program converts its PCM on the device with it
    (the server's wav and pcm bytes), the conversation WebSocket on the host."""
    return (audio.clip(-1, 1) * 32767).astype(np.int16)


def resample(audio: np.ndarray, sample_rate: int, target_sr: int) -> np.ndarray:
    """Mono audio at `sample_rate` -> float32 at `target_sr` (soxr "HQ"); as it is when the rates agree."""
    audio = np.asarray(audio, np.float32)
    if int(sample_rate) == int(target_sr):
        return audio
    return soxr.resample(audio, int(sample_rate), int(target_sr), quality="HQ").astype(np.float32)


def to_mono(samples: np.ndarray, sample_rate: int, target_sr: int = SAMPLE_RATE, what: str = "audio") -> np.ndarray:
    """(L,) or (L, channels) samples at `sample_rate` -> mono float32 (L',) at `target_sr`.

    Channels are averaged. Integer PCM is scaled to [-1, 1].
    """
    samples = np.asarray(samples)
    if samples.ndim == 2:
        if samples.shape[1] == 0:
            raise ValueError(f"{what}: has zero channels")
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / float(np.iinfo(samples.dtype).max)
        samples = samples.astype(np.float32).mean(axis=1)
    elif samples.ndim != 1:
        raise ValueError(f"{what}: expected samples shaped (L,) or (L, channels), got {samples.shape}")
    audio = check_audio(samples, what)
    if int(sample_rate) <= 0:
        raise ValueError(f"{what}: invalid sample rate {sample_rate}")
    if int(sample_rate) != target_sr:
        audio = resample(audio, sample_rate, target_sr)
        if audio.size == 0:
            raise ValueError(f"{what}: too short to resample from {sample_rate} Hz to {target_sr} Hz")
    return audio


def load_audio(path: str | os.PathLike, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Reads any file soundfile supports and returns mono float32 (L,) at `sample_rate` (24 kHz by default)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"audio file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected an audio file, got a directory: {path}")
    try:
        samples, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"cannot read audio file {path}: {e}. Supported formats: "
                         f"{', '.join(sorted(sf.available_formats()))}") from e
    return to_mono(samples, sr, sample_rate, what=str(path))


def check_output_folder(path: str | os.PathLike) -> Path:
    """The folder `path` will be written in; raises if it is missing or not writable."""
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"output folder {parent} is a file: give a path in a folder")
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {parent} (create it first)")
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"output folder is not writable: {parent}")
    return parent


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Writes mono audio to WAV/FLAC (16-bit PCM) or OGG (by extension) atomically.

    The data goes to a temporary file in the same folder first and is renamed over `path` only when complete,
    so a failure never leaves a half-written file behind.
    """
    path = Path(path)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"write_audio expects mono audio shaped (samples,), got {audio.shape}")
    if not np.isfinite(audio).all():
        raise ValueError(f"refusing to write {path}: the audio contains NaN or infinite samples")
    ext = path.suffix.lower().lstrip(".")
    formats = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}
    if ext not in formats:
        raise ValueError(f"unsupported output extension '.{ext}' for {path}; use .wav, .flac or .ogg")
    subtype = "PCM_16" if ext in ("wav", "flac") else None
    return _atomic_write(path, f".tmp.{ext}", lambda fh: sf.write(fh, np.clip(audio, -1.0, 1.0), sample_rate,
                                                                   format=formats[ext], subtype=subtype))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """np.save through a temporary file in the same folder and a rename: never a half-written .npy."""
    return _atomic_write(Path(path), ".tmp.npy", lambda fh: np.save(fh, array))


def remove_unfinished(path: str | os.PathLike) -> None:
    """Removes the temporary files a killed process left while writing `path` (atomically, as above)."""
    path = Path(path)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{path.suffix.lower()}"):
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, suffix: str, write) -> Path:
    """`write(file object)` into a temporary file beside `path`, synced and renamed over it only when complete."""
    parent = check_output_folder(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600: give open()'s usual mode
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())  # on disk before it has its name: a crash never leaves a named, empty file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
