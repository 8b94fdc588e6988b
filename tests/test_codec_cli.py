"""scripts/codec.py as a user runs it: real processes, real audio files, a random checkpoint on disk."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from csm_jax.audio import load_audio
from csm_jax.testing.inputs import speech_like

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "codec.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_encode_decode_roundtrip_matches_moshi(tmp_path, mimi_files):
    model = mimi_files["moshi_model"]
    stereo = np.stack([speech_like(44100 * 2, seed=1), speech_like(44100 * 2, seed=2)], 1)
    wav_in = tmp_path / "in.flac"
    sf.write(wav_in, stereo, 44100)
    codes_path = tmp_path / "codes.npy"
    r = run("encode", wav_in, codes_path, "--checkpoint", mimi_files["moshi_path"])
    assert r.returncode == 0, r.stderr
    codes = np.load(codes_path)
    assert codes.dtype == np.int32 and codes.shape == (32, 25)  # 2 s at 24 kHz = 48000 samples = 25 frames

    x = load_audio(wav_in)  # the same mono 24 kHz signal the CLI encoded
    with torch.no_grad():
        ref = model.encode(torch.from_numpy(x)[None, None]).numpy()[0]
        ref_audio = model.decode(torch.from_numpy(codes[None].astype(np.int64))).numpy()[0, 0]
    np.testing.assert_array_equal(codes, ref)

    out = tmp_path / "out.wav"
    r = run("decode", codes_path, out, "--checkpoint", mimi_files["hf_dir"])  # the other layout, same weights
    assert r.returncode == 0, r.stderr
    y, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and y.shape == (1920 * 25,)
    # 16-bit PCM output: half a quantisation step, plus our 1e-4-of-peak audio tolerance.
    assert np.abs(y - np.clip(ref_audio, -1, 1)).max() <= 0.5 / 32767 + 1e-4 * np.abs(ref_audio).max() + 1e-6


@pytest.mark.slow
def test_cli_errors_are_clear(tmp_path, mimi_files):
    bad_audio = tmp_path / "bad.wav"
    bad_audio.write_bytes(b"not audio")
    r = run("encode", bad_audio, tmp_path / "c.npy", "--checkpoint", mimi_files["moshi_path"])
    assert r.returncode == 2 and "cannot read audio file" in r.stderr
    np.save(tmp_path / "oob.npy", np.full((32, 3), 4000, np.int32))
    r = run("decode", tmp_path / "oob.npy", tmp_path / "o.wav", "--checkpoint", mimi_files["moshi_path"])
    assert r.returncode == 2 and "[0, 2048)" in r.stderr
    r = run("encode", tmp_path / "missing.wav", tmp_path / "c.npy")
    assert r.returncode == 2 and "not found" in r.stderr
    # Found before the checkpoint (which does not exist) is read.
    gone = tmp_path / "no-checkpoint"
    sf.write(tmp_path / "ok.wav", speech_like(4800, seed=3), 24000)
    np.save(tmp_path / "ok.npy", np.zeros((32, 3), np.int32))
    (tmp_path / "text.npy").write_text("0 1 2\n")
    for args, message in [(["decode", tmp_path / "text.npy", tmp_path / "o.wav"], "text.npy is not a .npy file: "
                            "give codes that `codec encode` (or numpy.save) wrote"),
                          (["encode", tmp_path / "ok.wav", tmp_path / "bad.wav" / "c.npy"],
                           "output folder " + str(tmp_path / "bad.wav") + " is a file"),
                          (["decode", tmp_path / "ok.npy", tmp_path / "o.mp3"], "a .wav, .flac or .ogg file"),
                          (["decode", tmp_path / "ok.npy", tmp_path / "none" / "o.wav"],
                           "output folder does not exist")]:
        r = run(*args, "--checkpoint", gone)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 2 and last.startswith("error: ") and message in last, (args, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.wav", "ok.npy", "ok.wav", "oob.npy", "text.npy"]
