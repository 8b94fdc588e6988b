"""scripts/finetune.py end to end: espeak-ng utterances -> Mimi cache -> training -> export -> generation.

A micro CSM (widths 128 / 64, random weights; the tiny fixture's config, Mimi and tokenizer) trains on a few
utterances until the loss has fallen at least 10x; the export loads in our Generator, which then speaks the
first frames of a training utterance greedily much as it was trained on (the first frame's codebook 0
exactly, and at least 30% of the first three frames' codes). Bad examples are reported, not dropped.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from csm_jax.csm import CsmConfig, init_params
from csm_jax.train.export import hf_tensors

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["Hello there.", "Good morning.", "Thank you.", "See you soon."]


def micro_base(csm_dir: Path, folder: Path) -> Path:
    """csm_dir's config with smaller widths, random weights in transformers' layout, its Mimi and tokenizer."""
    from safetensors.numpy import load_file, save_file

    config = json.loads((csm_dir / "config.json").read_text())
    config.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    config["depth_decoder_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                          num_key_value_heads=1, head_dim=32, backbone_hidden_size=128)
    cfg = CsmConfig.from_hf_config(config)
    tensors = hf_tensors(cfg, init_params(cfg, jax.random.key(0)))
    tensors.update({k: v for k, v in load_file(str(csm_dir / "model.safetensors")).items()
                    if k.startswith("codec_model.")})
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(csm_dir / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def voice_data(tmp_path_factory):
    from converse_fixtures import speak

    folder = tmp_path_factory.mktemp("voice")
    for i, text in enumerate(TEXTS):
        speak(text, folder / f"u{i}.wav")
        (folder / f"u{i}.txt").write_text(text)
    (folder / "u9.json").write_text(json.dumps({"speaker": 1}))
    # Bad examples, reported and skipped: no transcript, unreadable audio, empty transcript.
    shutil.copy(folder / "u0.wav", folder / "orphan.wav")
    (folder / "broken.wav").write_bytes(b"RIFF not really a wave file")
    (folder / "broken.txt").write_text("Broken.")
    shutil.copy(folder / "u1.wav", folder / "silent.wav")
    (folder / "silent.txt").write_text("   ")
    return folder


def run_finetune(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_finetune_overfits_exports_and_speaks(csm_dir, voice_data, tmp_path):
    base = micro_base(Path(csm_dir), tmp_path / "base")
    out = tmp_path / "run"
    r = run_finetune("--data", voice_data, "--out", out, "--checkpoint", base, "--steps", 60, "--batch-size", 3,
                     "--learning-rate", 3e-3, "--warmup-steps", 5, "--weight-decay", 0, "--depth-ratio", 1,
                     "--eval-fraction", 0.25, "--eval-every", 30, "--checkpoint-every", 30, "--keep", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    for name, why in (("orphan.wav", "no transcript"), ("broken", "cannot read audio"), ("silent", "empty transcript")):
        assert any(name in line and why in line for line in r.stderr.splitlines()), (name, r.stderr[-2000:])
    skipped = (out / "cache" / "skipped.txt").read_text()
    assert len(skipped.splitlines()) == 3, skipped
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 61))
    first, last = lines[0]["loss"], lines[-1]["loss"]
    assert first / last >= 10, [round(m["loss"], 3) for m in lines]
    assert "eval_loss" in lines[29] and "eval_loss" in lines[59] and "eval_loss" not in lines[0]
    assert all(m["frames_per_s"] > 0 and m["tokens_per_s"] > 0 for m in lines)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["60"]

    # The export speaks a training utterance's first frames greedily as trained.
    from csm_jax.generate import Generator
    from csm_jax.train import data as D

    gen = Generator(str(out / "export"))
    index = [json.loads(x) for x in (out / "cache" / "index.jsonl").read_text().splitlines()]
    train_names = set(index[i]["name"] for i in D.split_eval(len(index), 0.25, 0)[0])
    ex = next(e for e in index if e["name"] in train_names)
    turn = ex["turns"][-1]
    want = np.load(out / "cache" / "codes" / turn["codes"])[:, :3].astype(np.int32)
    codes = gen.generate_codes([turn["text"]], speakers=turn["speaker"], temperature=0, max_audio_ms=240)[0]
    assert codes.shape[1] >= 1
    n = min(3, codes.shape[1])
    agree = np.mean(codes[:, :n] == want[:, :n])  # chance: 1 / 2048 (0.42 measured after 60 steps)
    assert codes[0, 0] == want[0, 0] and agree >= 0.3, (agree, codes[:, :n], want[:, :n])


@pytest.mark.slow
def test_bad_settings_are_named_by_the_library_and_by_their_flags(tmp_path):
    from csm_jax.train.step import SettingError, TrainConfig

    # The library names the settings as its fields; the command names them as its flags.
    with pytest.raises(SettingError, match="`steps`, `batch_size` and `accumulate` must be at least 1"):
        TrainConfig(steps=0).check()
    r = run_finetune("--data", tmp_path, "--out", tmp_path / "run", "--steps", 0)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: --steps, --batch-size and --accumulate must be at least 1" in r.stderr, r.stderr[-2000:]
    for flag, value, message in [("--learning-rate", -1e-4, "must be above 0"), ("--clip-norm", 0, "must be above 0"),
                                 ("--min-lr-ratio", 2, "must lie in [0, 1]"), ("--warmup-steps", -1, "0 or more"),
                                 ("--weight-decay", -0.1, "0 or more")]:
        r = run_finetune("--data", tmp_path, "--out", tmp_path / "run", flag, value)
        assert r.returncode == 2 and f"error: {flag} must" in r.stderr and message in r.stderr, r.stderr[-2000:]
    (tmp_path / "a-file").write_text("x")
    r = run_finetune("--data", tmp_path, "--out", tmp_path / "a-file")
    assert r.returncode == 2 and "--out " + str(tmp_path / "a-file") + " is a file" in r.stderr, r.stderr[-2000:]
    r = run_finetune("--data", tmp_path, "--out", tmp_path / "run", "--mesh-model", 3)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: --mesh-data x --mesh-model (all x 3): model=3 must be a positive divisor of the 1 devices" \
        in r.stderr, r.stderr[-2000:]
