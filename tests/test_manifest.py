"""csm_jax.manifest: what a rerun of a batch job reads back, and what it refuses (no model involved)."""

import json
import re

import pytest

from csm_jax.manifest import Manifest

TEXTS = ["First line.", "Second line.", "Third line.", "Fourth line."]
JOB = {"checkpoint": "tiny", "seed": 0, "temperature": 0.9, "context": []}


def _write(folder, index, m=None):
    (folder / f"{index:03d}.wav").write_bytes(b"RIFF")
    if m is not None:
        m.add(index, f"{index:03d}.wav", 0.16 * (index + 1), 1000 * index)


def _lines(path):
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_written_utterances_are_read_back_across_processes(tmp_path):
    m = Manifest(tmp_path, JOB, TEXTS)
    assert m.done == {}
    _write(tmp_path, 0, m)
    _write(tmp_path, 2, m)
    m.close()
    lines = _lines(tmp_path / "manifest.jsonl")
    assert lines[0]["job"] == JOB and lines[0]["utterances"] == 4
    assert lines[1:] == [{"index": 0, "text": "First line.", "file": "000.wav", "audio_s": 0.16, "seed": 0},
                         {"index": 2, "text": "Third line.", "file": "002.wav", "audio_s": 0.48, "seed": 2000}]
    # Process 1 of 2 in a rerun: its own file, and it knows what the single process wrote.
    m1 = Manifest(tmp_path, JOB, TEXTS, process=1, processes=2)
    assert sorted(m1.done) == [0, 2]
    _write(tmp_path, 1, m1)
    m1.close()
    assert [e["index"] for e in _lines(tmp_path / "manifest.process1.jsonl")[1:]] == [1]
    (tmp_path / "002.wav").unlink()  # a file gone: that utterance is spoken again
    m = Manifest(tmp_path, JOB, TEXTS)
    assert sorted(m.done) == [0, 1]
    m.close()
    # With --save-codes, the .npy must be there too.
    (tmp_path / "000.npy").write_bytes(b"x")
    m = Manifest(tmp_path, JOB, TEXTS, also=(".npy",))
    assert sorted(m.done) == [0]
    m.close()


def test_a_line_cut_short_is_dropped(tmp_path):
    m = Manifest(tmp_path, JOB, TEXTS)
    _write(tmp_path, 0, m)
    m.close()
    with open(tmp_path / "manifest.jsonl", "ab") as fh:
        fh.write(b'{"index": 1, "text": "Seco')  # killed in the middle of an append
    _write(tmp_path, 1)
    m = Manifest(tmp_path, JOB, TEXTS)
    assert sorted(m.done) == [0]
    _write(tmp_path, 1, m)
    m.close()
    assert [e["index"] for e in _lines(tmp_path / "manifest.jsonl")[1:]] == [0, 1]


def test_other_settings_or_texts_are_refused(tmp_path):
    m = Manifest(tmp_path, JOB, TEXTS)
    _write(tmp_path, 1, m)
    m.close()
    before = (tmp_path / "manifest.jsonl").read_bytes()
    cases = [
        ({**JOB, "temperature": 0.5, "seed": 7}, TEXTS,
         "holds a job with other settings (manifest.jsonl): --seed was 0, now 7; --temperature was 0.9, now 0.5."),
        ({**JOB, "context": [{"audio_sha256": "ab" * 32, "transcript": "x" * 100, "speaker": 0}]}, TEXTS,
         "--context differs."),
        (JOB, [TEXTS[0], "Second line, changed.", *TEXTS[2:]],
         "the texts differ from those of the job in {d} (manifest.jsonl): utterance 1 (001.wav) was 'Second line.', "
         "now 'Second line, changed.'."),
        (JOB, TEXTS + ["Fifth."], "it had 4 utterances, now 5."),
        (JOB, [TEXTS[0], TEXTS[1], "Third, changed.", TEXTS[3]], "an utterance not yet written changed."),
    ]
    for job, texts, msg in cases:
        with pytest.raises(ValueError) as e:
            Manifest(tmp_path, job, texts, process=1, processes=2)
        assert msg.replace("{d}", str(tmp_path)) in str(e.value), str(e.value)
        assert "give another --out-dir" in str(e.value)
    # Nothing written, and no empty manifest of process 1 left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["001.wav", "manifest.jsonl"]
    assert (tmp_path / "manifest.jsonl").read_bytes() == before


def test_a_second_writer_and_a_foreign_file_are_refused(tmp_path):
    m = Manifest(tmp_path, JOB, TEXTS)
    with pytest.raises(ValueError, match=re.escape(f"another process is writing {tmp_path / 'manifest.jsonl'}")):
        Manifest(tmp_path, JOB, TEXTS)
    m.close()
    (tmp_path / "manifest.process3.jsonl").write_text('{"job": {}}\nnot json\n')
    with pytest.raises(ValueError, match=re.escape("manifest.process3.jsonl line 2 is not a manifest line")):
        Manifest(tmp_path, JOB, TEXTS)
    (tmp_path / "manifest.process3.jsonl").write_text('{"files": 3}\n')
    with pytest.raises(ValueError, match="is not a manifest of csm-jax's synthesize"):
        Manifest(tmp_path, JOB, TEXTS)


def test_a_local_checkpoint_is_the_same_job_however_it_is_spelled(tmp_path, monkeypatch):
    """synthesize's job settings: a rerun that spells the same folder another way ("ckpt/", "./ckpt") continues
    the job; another folder, or a hub id, is another job."""
    from csm_jax.commands.synthesize import Args, _job

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "other").mkdir()
    jobs = [_job(Args(text=["hi"], checkpoint=c)) for c in ("ckpt", "ckpt/", "./ckpt", "ckpt//")]
    assert all(j == jobs[0] for j in jobs) and jobs[0]["checkpoint"] == "ckpt"
    assert _job(Args(text=["hi"], checkpoint="other"))["checkpoint"] == "other"
    assert _job(Args(text=["hi"], checkpoint="sesame/csm-1b"))["checkpoint"] == "sesame/csm-1b"
