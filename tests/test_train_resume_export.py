"""Training state: an interrupted-and-resumed run equals the uninterrupted one (orbax checkpoints of
parameters, optimizer state and data position); export to transformers' layout loads in transformers and
gives our logits (LoRA merged)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from csm_jax.csm import CsmConfig, embed_rows, init_params
from csm_jax.llama import LlamaConfig, linear
from csm_jax.text import Segment, Tokenizer
from csm_jax.train import data as D
from csm_jax.train.step import SettingError, TrainConfig
from csm_jax.train.trainer import RunOptions, fit

pytestmark = pytest.mark.slow  # every test here takes tens of seconds on 2 cores

MICRO = CsmConfig(backbone=LlamaConfig(2, 128, 4, 2, 32, 256),
                  decoder=LlamaConfig(2, 64, 2, 1, 32, 128, max_seq_len=32))


def synthetic_rows(n=5, seed=0):
    tok = Tokenizer(os.environ["CSM_JAX_TEST_TOKENIZER"])
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        context = [Segment(1, "Earlier turn.", codes=rng.integers(0, 2048, (32, 4)))] if i % 2 else []
        codes = rng.integers(0, 2048, (32, 22 + i))
        rows.append(D.example_rows(tok, context + [Segment(0, f"Utterance {i}.", codes=codes)]))
    assert all(33 <= len(r) <= 64 for r in rows)  # one padded length: one compilation
    return rows


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_equals_uninterrupted(tmp_path, lora_rank):
    rows = synthetic_rows()
    tc = TrainConfig(steps=5, batch_size=2, accumulate=2, learning_rate=1e-3, warmup_steps=2, depth_ratio=0.25,
                     lora_rank=lora_rank, freeze_backbone=bool(lora_rank), seed=3)
    quiet = dict(progress=False, eval_every=2)
    keys = ("step", "epoch", "loss", "backbone_loss", "depth_loss", "grad_norm", "lr", "frames", "eval_loss")
    whole, _, h1 = fit(MICRO, init_params(MICRO, jax.random.key(0)), rows[:4], rows[4:], tc,
                       RunOptions(tmp_path / "a", checkpoint_every=2, keep=2, **quiet), log=lambda s: None)
    _, _, part = fit(MICRO, init_params(MICRO, jax.random.key(0)), rows[:4], rows[4:], tc,
                     RunOptions(tmp_path / "b", checkpoint_every=2, keep=2, stop_after=3, **quiet), log=lambda s: None)
    assert [m["step"] for m in part] == [1, 2, 3]
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 3]
    with pytest.raises(SettingError, match="`resume`"):  # never silently overwrites a run
        fit(MICRO, init_params(MICRO, jax.random.key(0)), rows[:4], rows[4:], tc,
            RunOptions(tmp_path / "b", **quiet), log=lambda s: None)
    resumed, _, h2 = fit(MICRO, init_params(MICRO, jax.random.key(0)), rows[:4], rows[4:], tc,
                         RunOptions(tmp_path / "b", checkpoint_every=2, keep=2, resume=True, **quiet),
                         log=lambda s: None)
    assert [m["step"] for m in h2] == [4, 5]
    curve = lambda h: [{k: m.get(k) for k in keys} for m in h]  # noqa: E731
    assert curve(part + h2) == curve(h1)
    assert h1[-1]["loss"] < h1[0]["loss"]
    import json

    logged = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert curve(logged) == curve(h1)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_loads_in_transformers_with_our_logits(csm_dir, tmp_path):
    from transformers import CsmForConditionalGeneration

    from csm_jax.checkpoints import load_csm
    from csm_jax.train.export import export_hf
    from csm_jax.train.lora import init_lora, merge
    from csm_jax.train.loss import transformer

    ckpt = load_csm(csm_dir, jnp.float32)
    cfg = ckpt.config
    lora = init_lora(cfg, jax.random.key(1), rank=2, targets=("q_proj", "v_proj", "down_proj"))
    lora = jax.tree.map(lambda a: a if a.shape[0] == 2 else 0.05 * jax.random.normal(jax.random.key(7), a.shape), lora)
    merged = merge(cfg, ckpt.params, lora, 4.0)
    out = export_hf(tmp_path / "export", cfg, ckpt.params, csm_dir, lora=lora, lora_scale=4.0)
    back = load_csm(out, jnp.float32)  # our loader reads it back exactly
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(back.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.codec_tensors is not None and back.tokenizer_file is not None

    rows = synthetic_rows(2, seed=1)
    batch = D.collate(rows, 2, 1.0, np.random.default_rng(0), 2)
    x = embed_rows(cfg, merged, batch["tokens"], batch["mask"])
    h = transformer(cfg.backbone, merged["backbone"], x)
    ours = np.asarray(linear(h, merged["c0_head"], jnp.float32))

    model = CsmForConditionalGeneration.from_pretrained(str(out)).eval()
    C, V = 32, cfg.audio_vocab_size
    tokens, mask = torch.from_numpy(batch["tokens"]).long(), torch.from_numpy(batch["mask"])
    with torch.no_grad():
        audio = model.backbone_model.embed_tokens.embed_audio_tokens(tokens[..., :C] + torch.arange(C) * V)
        xt = (audio * mask[..., :C, None]).sum(2) + model.embed_text_tokens(tokens[..., C]) * mask[..., C:]
        theirs = model(inputs_embeds=xt).logits.numpy()
    n = len(rows[0])  # the first sequence's real rows (the second is right-padded like it)
    ref = theirs[0, :n]
    assert np.max(np.abs(ours[0, :n] - ref)) / np.max(np.abs(ref)) < 1e-4
    # The merged adapters changed the model: the base gives other logits.
    xb = embed_rows(cfg, ckpt.params, batch["tokens"], batch["mask"])
    hb = transformer(cfg.backbone, ckpt.params["backbone"], xb)
    base = np.asarray(linear(hb, ckpt.params["c0_head"], jnp.float32))
    assert np.max(np.abs(base[0, :n] - ref)) / np.max(np.abs(ref)) > 1e-3
