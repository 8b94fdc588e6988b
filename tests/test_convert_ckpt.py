"""scripts/convert_ckpt.py: Sesame's pickled ckpt.pt -> safetensors that load like the original weights."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import jax

from csm_jax.checkpoints import load_csm
from csm_jax.testing.tiny_csm import build_hf_csm, hf_to_sesame_tensors, save_sesame_layout

pytestmark = pytest.mark.slow  # every test here takes tens of seconds on 2 cores

ROOT = Path(__file__).resolve().parents[1]


def test_ckpt_pt_roundtrip(tmp_path):
    model = build_hf_csm(seed=2)
    ref_dir = save_sesame_layout(model, tmp_path / "ref")
    sd = {k: torch.from_numpy(v) for k, v in hf_to_sesame_tensors(model.state_dict(), model.config).items()}
    torch.save(sd, tmp_path / "ckpt.pt")
    out = tmp_path / "converted"
    out.mkdir()
    (out / "config.json").write_text((ref_dir / "config.json").read_text())  # tiny dims, not csm-1b's
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_ckpt.py"), str(tmp_path / "ckpt.pt"), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    a, b = load_csm(ref_dir), load_csm(out)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"garbage")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_ckpt.py"), str(junk), str(tmp_path / "o2")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "not a loadable PyTorch checkpoint" in r.stderr
