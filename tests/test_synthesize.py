"""scripts/synthesize.py as a user runs it: a real process, a tiny random checkpoint folder, real audio files."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csm_jax.testing.inputs import speech_like

pytestmark = pytest.mark.slow  # every test here takes tens of seconds on 2 cores

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


def test_mistakes_are_refused_before_the_model_loads_and_create_nothing(tmp_path):
    # The checkpoint does not exist: each mistake must be found before loading it is tried.
    gone = tmp_path / "no-checkpoint"
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "latin1.txt").write_bytes("Caf\xe9 au lait.\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "two.txt").write_text("First.\nSecond line. Third sentence.\n")
    new = tmp_path / "new"
    cases = [
        (["--text", "hi", "--out-dir", tmp_path / "a-file"], "--out-dir", "is a file, not a folder"),
        (["--text", "hi", "--out-dir", tmp_path / "a-file" / "sub"], "--out-dir", "cannot be created"),
        (["--text-file", tmp_path / "latin1.txt", "--out-dir", new], "--text-file", "is not UTF-8 text (byte 0xe9"),
        (["--text-file", tmp_path / "blank.txt", "--out-dir", new], "--text-file", "only blank lines"),
        (["--text-file", tmp_path, "--out-dir", new], "--text-file", "is not a file"),
        (["--text", "hi", "--out-dir", new, "--frames-per-call", 0], "--frames-per-call 0", "at least 1"),
        (["--text", "hi", "--out-dir", new, "--temperature", -0.5], "--temperature -0.5", "0 (greedy) or more"),
        (["--text", "hi", "--out-dir", new, "--topk", 0], "--topk 0", "from 1 to 2048"),
        (["--text", "hi", "--out-dir", new, "--seed", -1], "--seed -1", "give 0 to 4294967295"),
        # Utterance 1's second sentence would use seed + 1001, past 2**32 - 1.
        (["--text-file", tmp_path / "two.txt", "--out-dir", new, "--seed", 2**32 - 1001], "--seed 4294966295",
         "give 0 to 4294966294"),
    ]
    job = tmp_path / "job"
    job.mkdir()
    (job / "manifest.jsonl").write_text("")
    cases.append((["--text", "hi", "--out-dir", job], "--out-dir", "holds a --text-file job (manifest*.jsonl)"))
    for args, flag, msg in cases:
        r = run("--checkpoint", gone, *args)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == 2 and last.startswith(f"error: {flag}") and msg in last, (args, r.stderr)
    assert not new.exists()  # a refused job creates no folder
    assert (tmp_path / "a-file").read_text() == "x"


LINES = ["Good morning.", "The sky is clear today.", "Bring a coat anyway.", "We leave at nine.",
         "The train is on time.", "Tea or coffee?", "It was a long week.", "See you soon."]


def _manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _stamps(folder):
    """name -> (bytes, modification time in ns) of every file in `folder`."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_killed_batch_job_resumes_where_it_stopped(tmp_path, csm_dir):
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out"
    job = ["--checkpoint", csm_dir, "--text-file", text, "--out-dir", out, "--batch-size", 1, "--max-audio-ms", 320,
           "--frames-per-call", 2, "--seed", 3]
    # The rerun loads the programs the first run compiled from a cache of this test's own.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    # Killed (SIGKILL, as a preempted machine's job is) once the manifest holds its first utterance.
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "synthesize.py"), *map(str, job)], env=env,
                                stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "manifest.jsonl").exists() and len(_manifest(out)) >= 2:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()
    first = _manifest(out)
    k = len(first) - 1
    assert 1 <= k < len(LINES), first  # killed in the middle of the job
    finished = {e["file"] for e in first[1:]}
    before = {name: stamp for name, stamp in _stamps(out).items() if name in finished}

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "synthesize.py"), *map(str, job)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"{out}: {k} of {len(LINES)} utterances are written already (manifest*.jsonl); {len(LINES) - k} to go" \
        in r.stderr
    spoken = sorted(int(m) for m in re.findall(r"(\d{3})\.wav: ", r.stdout))
    assert spoken == sorted(set(range(len(LINES))) - {int(f[:3]) for f in finished})
    after = _stamps(out)
    assert sorted(after) == sorted([f"{i:03d}.wav" for i in range(len(LINES))] + ["manifest.jsonl"])  # no temps
    assert {name: after[name] for name in finished} == before  # the same bytes, not even rewritten
    lines = _manifest(out)
    assert lines[:len(first)] == first  # appended to, never rewritten
    assert lines[0]["utterances"] == len(LINES) and lines[0]["job"]["seed"] == 3
    assert sorted(e["index"] for e in lines[1:]) == list(range(len(LINES)))  # each exactly once
    for e in lines[1:]:
        i = e["index"]
        info = sf.info(out / e["file"])
        assert e == {"index": i, "text": LINES[i], "file": f"{i:03d}.wav", "audio_s": round(info.frames / 24000, 3),
                     "seed": 3 + 1000 * i}
        assert info.samplerate == 24000 and info.frames > 0

    # Done: a rerun writes nothing. Another temperature, or a changed line, is refused before the model loads.
    r = run(*job)
    assert r.returncode == 0 and f"{len(LINES)} of {len(LINES)} utterances are written already" in r.stderr, r.stderr
    assert _stamps(out) == after
    r = run(*job, "--temperature", 0.5)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"error: {out} holds a job with other settings (manifest.jsonl): --temperature was "
                               f"0.9, now 0.5. To finish that job") and "give another --out-dir" in r.stderr, r.stderr
    text.write_text("\n".join(["Good evening."] + LINES[1:]) + "\n")
    r = run(*job)
    assert r.returncode == 2 and "utterance 0 (000.wav) was 'Good morning.', now 'Good evening.'" in r.stderr, r.stderr
    assert _stamps(out) == after
