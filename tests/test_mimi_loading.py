"""Strict Mimi loading: every malformed file is a clear error naming the file and the key."""

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from csm_jax.checkpoints import CheckpointError
from csm_jax.mimi import load_mimi


@pytest.fixture(scope="module")
def moshi_tensors(mimi_files):
    return load_file(str(mimi_files["moshi_path"]))


def _save(tmp_path, tensors, name="tokenizer-test.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_missing_key(tmp_path, moshi_tensors):
    t = dict(moshi_tensors)
    del t["decoder_transformer.transformer.layers.3.layer_scale_2.scale"]
    path = _save(tmp_path, t)
    with pytest.raises(CheckpointError, match=r"missing tensor 'decoder_transformer.transformer.layers.3.layer_scale_2"
                                              r".scale' \(expected shape \(512,\)\)") as e:
        load_mimi(path)
    assert str(path) in str(e.value)


def test_extra_key(tmp_path, moshi_tensors):
    t = dict(moshi_tensors, **{"encoder.model.99.conv.conv.weight": np.zeros((1,), np.float32)})
    with pytest.raises(CheckpointError, match=r"1 unexpected tensor.*'encoder.model.99.conv.conv.weight'"):
        load_mimi(_save(tmp_path, t))


def test_wrong_shape(tmp_path, moshi_tensors):
    t = dict(moshi_tensors)
    t["quantizer.rvq_rest.vq.layers.5._codebook.embedding_sum"] = np.zeros((1024, 256), np.float32)
    with pytest.raises(CheckpointError, match=r"'quantizer.rvq_rest.vq.layers.5._codebook.embedding_sum' has shape "
                                              r"\(1024, 256\), expected \(2048, 256\)"):
        load_mimi(_save(tmp_path, t))


def test_hf_file_with_missing_key(tmp_path, mimi_files):
    t = load_file(str(mimi_files["hf_dir"] / "model.safetensors"))
    del t["encoder_transformer.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(CheckpointError, match="missing tensor 'encoder_transformer.layers.0.self_attn.q_proj.weight'"):
        load_mimi(_save(tmp_path, t, "model.safetensors"))


def test_other_models_file(tmp_path):
    csm = {"backbone.layers.0.attn.q_proj.weight": np.zeros((4, 4), np.float32)}
    with pytest.raises(CheckpointError, match="CSM checkpoint without Mimi weights"):
        load_mimi(_save(tmp_path, csm))
    junk = {"foo.weight": np.zeros((2,), np.float32)}
    with pytest.raises(CheckpointError, match="not a Mimi checkpoint"):
        load_mimi(_save(tmp_path, junk, "junk.safetensors"))


def test_not_safetensors(tmp_path):
    pt = tmp_path / "mimi.pt"
    pt.write_bytes(b"\x80\x02}q\x00." + bytes(64))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_mimi(pt)
    with pytest.raises(FileNotFoundError):
        load_mimi(tmp_path / "nothing-here" / "x.safetensors")


def test_unsupported_config(tmp_path, mimi_files):
    import json
    import shutil

    d = tmp_path / "hf"
    shutil.copytree(mimi_files["hf_dir"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["sliding_window"] = 500
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="sliding_window=500"):
        load_mimi(d)
