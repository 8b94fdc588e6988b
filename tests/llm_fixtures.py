"""A real OpenAI-compatible LLM server for conversation tests: transformers' own `transformers serve` process
serving a tiny Llama the test writes, whose weights make it answer with a fixed reply.

The model is a bigram chain: its layers add nothing (zero output projections), so the next token depends
only on the last one, and the embeddings and output head link the assistant header's last token to the
reply's first token, each reply token to the next, and the last one to <|eot_id|>. Greedy or sampled at
any usual temperature, it writes REPLY; it runs through transformers' real chat template, tokenizer,
generation loop and streaming server.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPLY = "Hello there. How are you today?"
EOT = 128009


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_chain_model(folder: Path, tokenizer_json: str, reply: str = REPLY) -> Path:
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer.from_file(tokenizer_json)
    chain = [271] + tok.encode(reply, add_special_tokens=False).ids + [EOT]  # 271: "\n\n" after the header
    assert len(set(chain)) == len(chain), "each token may appear once in a bigram chain"
    dim = 64
    assert len(chain) <= dim
    cfg = LlamaConfig(vocab_size=128256, hidden_size=dim, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                      bos_token_id=128000, eos_token_id=[128001, EOT], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.normal_(0, 0.02)
        model.lm_head.weight.zero_()
        for k, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[cur] = 0
            model.model.embed_tokens.weight[cur, k] = 1.0
            model.lm_head.weight[nxt, k] = 4.0  # after RMSNorm the one-hot is 8: logit 32 vs ~0 elsewhere
    folder = Path(folder)
    model.save_pretrained(folder)
    shutil.copy(tokenizer_json, folder / "tokenizer.json")
    shutil.copy(Path(tokenizer_json).with_name("tokenizer_config.json"), folder / "tokenizer_config.json")
    return folder


class LLMServer:
    """`transformers serve MODEL` on a loopback port; .url is its OpenAI base URL."""

    def __init__(self, model_dir: Path, log: Path):
        self.port = free_port()
        self.model = str(model_dir)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        exe = Path(sys.executable).with_name("transformers")
        self.log = open(log, "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.proc = subprocess.Popen([str(exe), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.wait()

    def wait(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {Path(self.log.name).read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("transformers serve did not start")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
