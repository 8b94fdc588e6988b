"""Training data: manifest and folder reading, the Mimi-code cache, bad examples, batches, amortization."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from csm_jax.audio import FRAME_SAMPLES
from csm_jax.text import Segment, Tokenizer
from csm_jax.train import data as D


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(os.environ["CSM_JAX_TEST_TOKENIZER"])


def tone(path, seconds, freq, sr=16_000):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


@pytest.mark.slow
def test_cache_from_manifest_encodes_once_and_reports_bad_examples(mimi_files, tok, tmp_path):
    from csm_jax.mimi import encode, load_mimi

    _, mimi = load_mimi(mimi_files["hf_dir"])
    for name, secs, f in (("a", 0.5, 220), ("b", 0.33, 330), ("c", 0.9, 440), ("long", 3.0, 500)):
        tone(tmp_path / f"{name}.wav", secs, f)
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    lines = [{"audio": "a.wav", "text": "First.", "speaker": 0},
             {"audio": "b.wav", "text": "Second.", "speaker": 1,
              "context": [{"audio": "c.wav", "text": "Before.", "speaker": 0}]},
             {"audio": "bad.wav", "text": "Bad."},
             {"audio": "missing.wav", "text": "Missing."},
             {"audio": "a.wav", "text": ""},
             {"audio": "long.wav", "text": "Too long for the budget."},
             {"text": "no audio key"}]
    manifest = tmp_path / "data.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    log = []
    index, bad = D.build_cache(manifest, tmp_path / "cache", mimi, tok, max_seq_len=36, batch_size=2, log=log.append)
    reasons = dict(bad)
    assert len(bad) == 6, bad
    assert "cannot read audio" in reasons["data.jsonl:3"]
    assert "cannot read audio" in reasons["data.jsonl:4"]
    assert "empty transcript" in reasons["data.jsonl:5"]
    assert "too long" in reasons["data.jsonl:6"] and "36 positions" in reasons["data.jsonl:6"]
    assert "'audio' and 'text'" in reasons["data.jsonl:7"]
    assert "data.jsonl:8" in reasons
    assert all(any(name in line for line in log) for name in reasons)  # reported, not silent
    assert len((tmp_path / "cache" / "skipped.txt").read_text().splitlines()) == 6

    # Batched, padded encoding gives each file's codes as encoding it alone (padded to whole frames) does.
    entries = [json.loads(x) for x in index.read_text().splitlines()]
    assert [len(e["turns"]) for e in entries] == [1, 2]
    from csm_jax.audio import load_audio

    for e, wav in ((entries[0], "a.wav"), (entries[1], "b.wav")):
        audio = load_audio(tmp_path / wav)
        padded = np.zeros(-(-audio.size // FRAME_SAMPLES) * FRAME_SAMPLES, np.float32)
        padded[:audio.size] = audio
        want = np.asarray(encode(mimi, jnp.asarray(padded[None])))[0]
        got = np.load(tmp_path / "cache" / "codes" / e["turns"][-1]["codes"])
        np.testing.assert_array_equal(got, want)

    # A second build reuses the cache (no encoding).
    log.clear()
    D.build_cache(manifest, tmp_path / "cache", mimi, tok, max_seq_len=36, log=log.append)
    assert not any("encoded" in line for line in log)

    names, rows = D.load_index(tmp_path / "cache", tok, context_loss=False)
    r = rows[1]  # context turn then utterance: only the utterance's audio rows are labelled
    n_ctx = len(tok.segment_ids(0, "Before.")) + 12 + 1  # 0.9 s: 12 frames
    assert (r.labels[:n_ctx] == D.IGNORE).all()
    assert (r.labels[n_ctx:, 0] != D.IGNORE).sum() == 5 + 1 and r.eos.sum() == 2
    _, rows = D.load_index(tmp_path / "cache", tok, context_loss=True)
    assert (rows[1].labels[:, 0] != D.IGNORE).sum() == 13 + 6


def test_folder_reading(tmp_path):
    tone(tmp_path / "x.wav", 0.2, 300)
    (tmp_path / "x.txt").write_text("Hi.")
    (tmp_path / "x.json").write_text(json.dumps({"speaker": 2}))
    tone(tmp_path / "y.flac", 0.2, 300)
    (tmp_path / "y.txt").write_text("Yo.")
    tone(tmp_path / "z.wav", 0.2, 300)
    examples, bad = D.read_examples(tmp_path)
    assert [(e.name, e.turns[0].speaker, e.turns[0].text) for e in examples] == [("x", 2, "Hi."), ("y", 0, "Yo.")]
    assert bad == [("z.wav", "no transcript z.txt beside it")]
    with pytest.raises(FileNotFoundError, match="folder or a .jsonl"):
        D.read_examples(tmp_path / "nope")


def test_depth_frames_follow_transformers_rule(tok):
    rng = np.random.default_rng(0)
    rows = [D.example_rows(tok, [Segment(0, "A.", codes=rng.integers(0, 2048, (32, n)))]) for n in (37, 50, 21)]
    for ratio in (1 / 16, 0.5, 1.0):
        batch = D.collate(rows, 4, ratio, np.random.default_rng(1), 1)
        S = batch["tokens"].shape[1]
        assert S == D.bucket_length(max(len(r) for r in rows)) == 64
        n = 37 + 50 + 21
        want = n - int(n * (1 - ratio)) + 3  # kept frames plus every end-of-audio row
        valid = batch["depth_valid"]
        assert valid.sum() == want and len(valid) == D.depth_capacity(4, S, ratio, 1)
        picked = batch["depth_rows"][valid]
        assert len({tuple(p) for p in picked}) == want
        assert (batch["labels"][picked[:, 0], picked[:, 1], 0] != D.IGNORE).all()
        for b, r in enumerate(rows):  # every end-of-audio row is in
            end = int(np.argmax(r.eos))
            assert any((p == (b, end)).all() for p in picked)
    assert [D.bucket_length(n) for n in (1, 16, 17, 128, 129, 2048)] == [16, 16, 32, 128, 256, 2048]


def test_batches_are_a_function_of_seed_epoch_index(tok):
    rng = np.random.default_rng(0)
    rows = [D.example_rows(tok, [Segment(0, "A.", codes=rng.integers(0, 2048, (32, 5 + i)))]) for i in range(7)]
    a = D.Batches(rows, 2, 0.5, seed=4, max_turns=1)
    it = a.iterate()
    seen = [next(it) for _ in range(9)]  # 4 batches per epoch: crosses into epoch 2
    assert [(e, i) for e, i, _ in seen] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    epoch0 = sorted(i for batch in a.epoch_order(0) for i in batch)
    assert epoch0 == list(range(7))
    resumed = D.Batches(rows, 2, 0.5, seed=4, max_turns=1).iterate(1, 2)
    for (e, i, want), (e2, i2, got) in zip(seen[6:], resumed):
        assert (e, i) == (e2, i2)
        for k in want:
            np.testing.assert_array_equal(want[k], got[k])
    assert a.epoch_order(0) != a.epoch_order(1)
