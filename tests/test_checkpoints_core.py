import numpy as np
import pytest
from safetensors.numpy import save_file

from csm_jax.checkpoints import CheckpointError, StrictTensors, read_safetensors, read_safetensors_files, resolve_files


def test_non_safetensors_file_says_so(tmp_path):
    pt = tmp_path / "ckpt.pt"
    pt.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors(pt)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_safetensors(short)


def test_a_cut_short_file_says_to_fetch_it_again(tmp_path):
    whole = tmp_path / "whole.safetensors"
    save_file({"a": np.arange(4096, dtype=np.float32), "b": np.ones(64, np.float32)}, whole)
    data = whole.read_bytes()
    for cut in (len(data) - 100, 40):  # an interrupted download: in the tensors, then in the header
        part = tmp_path / f"cut{cut}.safetensors"
        part.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="damaged or incomplete .an interrupted download or copy.*"
                                                  "download or copy it again"):
            read_safetensors(part)
    assert set(read_safetensors(whole)) == {"a", "b"}


def test_duplicate_key_across_shards(tmp_path):
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "model-1.safetensors")
    save_file({"a": np.ones(2, np.float32)}, tmp_path / "model-2.safetensors")
    files = resolve_files(tmp_path, ["*.safetensors"])
    assert [f.name for f in files] == ["model-1.safetensors", "model-2.safetensors"]
    with pytest.raises(CheckpointError, match="duplicate tensor 'a'"):
        read_safetensors_files(files)


def test_strict_tensors_missing_shape_unexpected():
    st = StrictTensors({"w": np.zeros((2, 3)), "extra": np.zeros(1), "flag": np.zeros(1)}, "f.safetensors")
    with pytest.raises(CheckpointError, match=r"f.safetensors: missing tensor 'v' \(expected shape \(4,\)\)"):
        st.take("v", (4,))
    with pytest.raises(CheckpointError, match=r"'w' has shape \(2, 3\), expected \(3, 2\)"):
        st.take("w", (3, 2))
    assert st.take("w", (2, 3)).shape == (2, 3)
    st.skip("fl*")
    with pytest.raises(CheckpointError, match="1 unexpected tensor.*'extra'"):
        st.finish()


def test_local_path_that_is_not_a_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder"):
        resolve_files(tmp_path / "nope" / "model.safetensors", ["*.safetensors"])
