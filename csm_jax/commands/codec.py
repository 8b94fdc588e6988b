"""Mimi as a speech codec: audio file <-> int32 codes (num_codebooks, frames) at 12.5 Hz.

  python scripts/codec.py encode speech.wav codes.npy [--checkpoint kyutai/mimi] [--num-codebooks 32]
  python scripts/codec.py decode codes.npy speech.wav [--checkpoint kyutai/mimi]

Input audio may be any format soundfile reads, at any sample rate and channel count: it is mixed down to
mono and resampled to 24 kHz. Decoded audio is written at 24 kHz (.wav, .flac or .ogg by extension).
The checkpoint may store fp32, bf16 or fp16 weights; Mimi computes in float32 unless --dtype bfloat16.
A transformers CSM checkpoint works too: its codec_model.* part is its Mimi.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal, Union

import numpy as np
import tyro


@dataclasses.dataclass
class Encode:
    """Encode an audio file into Mimi codes saved as .npy (int32, shape (num_codebooks, frames))."""

    audio: tyro.conf.Positional[Path]
    """Input audio file (any format soundfile reads; resampled to 24 kHz mono)."""
    codes: tyro.conf.Positional[Path]
    """Output .npy file."""
    checkpoint: str = "kyutai/mimi"
    """Hub repo id, local folder or .safetensors file (Kyutai's or transformers' layout, or a transformers CSM
    checkpoint)."""
    num_codebooks: int = 32
    """Codebooks to keep, 1 to 32 (CSM uses 32)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype, whatever the file stores (in bfloat16 many codes differ from float32's)."""


@dataclasses.dataclass
class Decode:
    """Decode Mimi codes (.npy, shape (num_codebooks, frames)) into 24 kHz audio."""

    codes: tyro.conf.Positional[Path]
    """Input .npy file of integer codes in [0, 2048)."""
    audio: tyro.conf.Positional[Path]
    """Output audio file (.wav, .flac or .ogg)."""
    checkpoint: str = "kyutai/mimi"
    """Hub repo id, local folder or .safetensors file (Kyutai's or transformers' layout, or a transformers CSM
    checkpoint)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype, whatever the file stores (the audio is written from float32 either way)."""


Args = Union[Annotated[Encode, tyro.conf.subcommand("encode")], Annotated[Decode, tyro.conf.subcommand("decode")]]


def _load_codes(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"codes file not found: {path}")
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(f"{path} is not a .npy file: give codes that `codec encode` (or numpy.save) wrote")
    try:
        codes = np.load(path, allow_pickle=False)
    except ValueError as e:  # an object array (pickled), or a damaged file
        raise ValueError(f"{path} holds no plain integer array (numpy: {e}): give codes that `codec encode` "
                         "wrote") from e
    if codes.ndim != 2 or not 1 <= codes.shape[0] <= 32 or codes.shape[1] == 0:
        raise ValueError(f"{path}: expected codes shaped (num_codebooks <= 32, frames >= 1), got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{path}: codes must be integers, got {codes.dtype}")
    if codes.min() < 0 or codes.max() >= 2048:
        raise ValueError(f"{path}: codes must lie in [0, 2048), found {codes.min()}..{codes.max()}")
    return codes.astype(np.int32)


def main(cmd: Args) -> None:
    import jax.numpy as jnp

    from csm_jax import audio as audio_io
    from csm_jax.mimi import decode, encode, load_mimi

    if isinstance(cmd, Encode):
        if not 1 <= cmd.num_codebooks <= 32:
            raise ValueError(f"--num-codebooks must be between 1 and 32, got {cmd.num_codebooks}")
        x = audio_io.load_audio(cmd.audio)
        if cmd.codes.suffix != ".npy":
            raise ValueError(f"output must be a .npy file, got {cmd.codes}")
        audio_io.check_output_folder(cmd.codes)  # before the model loads and encodes
        _, params = load_mimi(cmd.checkpoint, cmd.dtype)
        codes = np.asarray(encode(params, jnp.asarray(x[None]), num_codebooks=cmd.num_codebooks))[0]
        audio_io.save_npy(cmd.codes, codes)
        print(f"{cmd.audio}: {len(x) / 24000:.2f} s -> {cmd.codes}: codes {codes.shape} int32")
    else:
        codes = _load_codes(cmd.codes)
        if cmd.audio.suffix.lower() not in (".wav", ".flac", ".ogg"):
            raise ValueError(f"output must be a .wav, .flac or .ogg file, got {cmd.audio}")
        audio_io.check_output_folder(cmd.audio)
        _, params = load_mimi(cmd.checkpoint, cmd.dtype)
        y = np.asarray(decode(params, jnp.asarray(codes[None])))[0]
        audio_io.write_audio(cmd.audio, y)
        print(f"{cmd.codes}: codes {codes.shape} -> {cmd.audio}: {len(y) / 24000:.2f} s at 24 kHz")

