import os

import numpy as np
import pytest
import soundfile as sf

from csm_jax import audio


def _sine(freq, sr, seconds, channels=1):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def _dominant_freq(x, sr):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spec)]


def test_stereo_44k_file_becomes_mono_24k(tmp_path):
    path = tmp_path / "in.flac"
    left = _sine(440.0, 44100, 2.0)
    right = _sine(440.0, 44100, 2.0)
    sf.write(path, np.stack([left, right], 1), 44100)
    x = audio.load_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - 48000) <= 1
    assert abs(_dominant_freq(x, 24000) - 440.0) < 1.0
    # Same amplitude after resampling (away from the edges), up to 16-bit FLAC quantisation.
    assert abs(np.abs(x[2000:-2000]).max() - 0.5) < 5e-3


def test_channels_are_averaged():
    left = np.full(100, 0.2, np.float32)
    right = np.full(100, -0.6, np.float32)
    x = audio.to_mono(np.stack([left, right], 1), 24000)
    np.testing.assert_allclose(x, -0.2, rtol=0, atol=1e-7)


def test_int16_pcm_is_scaled():
    x = audio.to_mono(np.array([0, 16384, -32767], np.int16), 24000)
    np.testing.assert_allclose(x, [0.0, 16384 / 32767, -1.0], atol=1e-6)


@pytest.mark.parametrize("bad, msg", [
    (np.zeros(0, np.float32), "empty"),
    (np.array([0.0, np.nan, 0.1], np.float32), "NaN"),
    (np.array([0.0, np.inf], np.float32), "NaN or infinite"),
])
def test_bad_samples_are_clear_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        audio.to_mono(bad, 24000)


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not audio at all")
    with pytest.raises(ValueError, match="cannot read audio file"):
        audio.load_audio(junk)
    with pytest.raises(FileNotFoundError):
        audio.load_audio(tmp_path / "missing.wav")


def test_write_roundtrip_and_atomicity(tmp_path):
    x = _sine(300.0, 24000, 0.5)
    out = audio.write_audio(tmp_path / "o.wav", x)
    y, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and len(y) == len(x)
    np.testing.assert_allclose(y, x, atol=1 / 32767 + 1e-6)
    # A failed write leaves nothing behind: no target, no temp file.
    with pytest.raises(ValueError, match="NaN"):
        audio.write_audio(tmp_path / "bad.wav", np.array([np.nan], np.float32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        audio.write_audio(tmp_path / "nodir" / "x.wav", x)
    with pytest.raises(ValueError, match="unsupported output extension"):
        audio.write_audio(tmp_path / "x.mp9", x)
    assert sorted(os.listdir(tmp_path)) == ["o.wav"]
