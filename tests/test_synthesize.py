"""scripts/synthesize.py as a user runs it: a real process, a tiny random checkpoint folder, real audio files."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from mimi_fixtures import speech_like

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "synthesize.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900, cwd=cwd)


def test_batch_with_stereo_44k_context(tmp_path, csm_dir):
    ctx = tmp_path / "voice.flac"
    sf.write(ctx, np.stack([speech_like(44100, seed=1), speech_like(44100, seed=2)], 1), 44100)
    out = tmp_path / "out"
    r = run("--checkpoint", csm_dir, "--text", "Hello there. This is a second sentence.", "--text", "Short one.",
            "--context", ctx, "It is nice to meet you.", 0, "--speaker", 1, "--out-dir", out, "--batch-size", 2,
            "--max-audio-ms", 480, "--save-codes", "--frames-per-call", 4)
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000.npy", "000.wav", "001.npy", "001.wav"]
    for i in range(2):
        y, sr = sf.read(out / f"{i:03d}.wav", dtype="float32")
        codes = np.load(out / f"{i:03d}.npy")
        assert sr == 24000 and codes.shape[0] == 32 and y.shape == (1920 * codes.shape[1],)
        assert codes.shape[1] <= 6 * (2 if i == 0 else 1)  # two sentences of at most 480 ms each
        assert np.abs(y).max() > 0
    # Same seed, same audio.
    r = run("--checkpoint", csm_dir, "--text", "Short one.", "--context", ctx, "It is nice to meet you.", 0,
            "--speaker", 1, "--out", tmp_path / "again.wav", "--max-audio-ms", 480, "--seed", 1000,
            "--frames-per-call", 4)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(sf.read(tmp_path / "again.wav")[0], sf.read(out / "001.wav")[0])


def test_bad_inputs_fail_clearly_without_partial_files(tmp_path, csm_dir):
    out = tmp_path / "o"
    out.mkdir()
    cases = [
        (["--text", "   ", "--out", out / "a.wav"], "text is empty"),
        (["--text", "hi", "--speaker", "one", "--out", out / "a.wav"], "speaker"),
        (["--text", "hi", "--out", tmp_path / "missing-dir" / "a.wav"], "output folder does not exist"),
        (["--text", "hi", "--out", out / "a.wav", "--context", tmp_path / "nope.wav", "x", 0], "not found"),
    ]
    for args, msg in cases:
        r = run("--checkpoint", csm_dir, *args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    long_ctx = tmp_path / "long.wav"
    sf.write(long_ctx, speech_like(24000 * 100, seed=4), 24000)  # 1250 frames + 900 to generate > 2048 rows
    r = run("--checkpoint", csm_dir, "--text", "hi", "--out", out / "a.wav", "--context", long_ctx, "long", 0,
            "--max-audio-ms", 72000)
    assert r.returncode == 2 and "prompt too long" in r.stderr, r.stderr
    # A checkpoint missing a tensor.
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in os.listdir(csm_dir):
        if f != "model.safetensors":
            (broken / f).write_bytes((csm_dir / f).read_bytes())
    t = load_file(str(csm_dir / "model.safetensors"))
    del t["lm_head.weight"]
    save_file(t, str(broken / "model.safetensors"))
    r = run("--checkpoint", broken, "--text", "hi", "--out", out / "a.wav")
    assert r.returncode == 2 and "missing tensor 'lm_head.weight'" in r.stderr, r.stderr
    if os.geteuid() != 0:  # root writes anywhere, so an unwritable folder can only be shown as another user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        r = run("--checkpoint", csm_dir, "--text", "hi", "--out", locked / "a.wav")
        assert r.returncode == 2 and "not writable" in r.stderr
    assert list(out.iterdir()) == []
