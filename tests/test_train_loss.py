"""Training loss and gradients against transformers' CsmForConditionalGeneration (torch autograd), full and LoRA.

The same tiny random weights and batch go to both: rows of text and audio as our prompts lay them out,
labels (B, S, 32) on the audio rows, and a fixed depth-decoder frame choice (transformers reads it from
labels whose codebooks 1..31 are -100; we from `depth_rows`). Tolerances: loss 1e-5 relative, each gradient
tensor 1e-4 relative to its largest entry, in fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from csm_jax.checkpoints import csm_params_from_tensors
from csm_jax.csm import CsmConfig
from csm_jax.train.export import hf_tensors
from csm_jax.train.lora import init_lora, target_rows
from csm_jax.train.loss import csm_loss

C, V, TEXT_VOCAB = 32, 2051, 1024


def small_vocab_csm(seed: int):
    """The fixtures' tiny CSM with a 1024-token text vocabulary (a quarter of the build time)."""
    from transformers import CsmForConditionalGeneration

    from csm_jax.testing.tiny_csm import tiny_hf_config

    config = tiny_hf_config()
    config.text_vocab_size = TEXT_VOCAB
    torch.manual_seed(seed)
    model = CsmForConditionalGeneration(config)
    with torch.no_grad():  # norms away from 1, so a missed scale shows
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    model = small_vocab_csm(seed=3)
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    cfg = CsmConfig.from_hf_config(model.config.to_dict())
    params, _ = csm_params_from_tensors(sd, cfg, "tiny", jnp.float32)
    return model, cfg, params


def make_batch(seed=0):
    """Two sequences: [text, audio frames, end-of-audio row], the second with a context turn, padded."""
    rng = np.random.default_rng(seed)
    layouts = [[("text", 7), ("audio", 12)], [("text", 4), ("audio", 5), ("text", 3), ("audio", 9)]]
    S = 34
    tokens = np.zeros((2, S, C + 1), np.int32)
    mask = np.zeros((2, S, C + 1), bool)
    labels = np.full((2, S, C), -100, np.int32)
    frames = []  # (b, t, is_eos)
    for b, layout in enumerate(layouts):
        t = 0
        for kind, n in layout:
            if kind == "text":
                tokens[b, t:t + n, C] = rng.integers(0, TEXT_VOCAB, n)
                mask[b, t:t + n, C] = True
            else:
                codes = rng.integers(0, 2048, (n, C))
                tokens[b, t:t + n, :C] = codes
                mask[b, t:t + n + 1, :C] = True  # frames, then the all-zero end-of-audio row
                labels[b, t:t + n + 1] = tokens[b, t:t + n + 1, :C]
                frames += [(b, t + i, i == n) for i in range(n + 1)]
                n += 1
            t += n
    # A fixed amortization choice: every third frame, and every end-of-audio row (as transformers keeps them).
    chosen = [(b, t) for i, (b, t, eos) in enumerate(frames) if eos or i % 3 == 0]
    K = 16
    assert len(chosen) <= K
    depth_rows = np.zeros((K, 2), np.int32)
    depth_rows[:len(chosen)] = chosen
    depth_valid = np.arange(K) < len(chosen)
    hf_labels = labels.copy()
    for b, t, _ in frames:
        if (b, t) not in chosen:
            hf_labels[b, t, 1:] = -100
    batch = {"tokens": tokens, "mask": mask, "labels": labels, "depth_rows": depth_rows, "depth_valid": depth_valid}
    return batch, hf_labels


def hf_loss(model, batch, hf_labels):
    tokens, mask = torch.from_numpy(batch["tokens"]).long(), torch.from_numpy(batch["mask"])
    offsets = torch.arange(C) * V
    audio = model.backbone_model.embed_tokens.embed_audio_tokens(tokens[..., :C] + offsets)  # (B, S, C, D)
    x = (audio * mask[..., :C, None]).sum(2) + model.embed_text_tokens(tokens[..., C]) * mask[..., C:]
    out = model(inputs_embeds=x, labels=torch.from_numpy(hf_labels).long())
    return out


def grads_by_name(model):
    return {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


def close(ours, ref, what, rtol=1e-4):
    err = np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30)
    assert err < rtol, f"{what}: relative error {err:.2e}"


@pytest.mark.slow
def test_loss_and_grads_match_transformers(models):
    model, cfg, params = models
    batch, hf_labels = make_batch()
    model.zero_grad()
    out = hf_loss(model, batch, hf_labels)
    out.loss.backward()
    ref = grads_by_name(model)

    (loss, aux), grads = jax.jit(jax.value_and_grad(lambda p, b: csm_loss(p, cfg, b), has_aux=True))(params, batch)
    for ours, theirs in ((loss, out.loss), (aux["backbone_loss"], out.backbone_loss),
                         (aux["depth_loss"], out.depth_decoder_loss)):
        assert abs(float(ours) - theirs.item()) <= 1e-5 * abs(theirs.item()), (float(ours), theirs.item())
    ours = hf_tensors(cfg, grads)
    ours["backbone_model.embed_tokens.embed_audio_tokens.weight"] = ours.pop("depth_decoder.model.embed_tokens.weight")
    assert set(ours) == set(ref), sorted(set(ours) ^ set(ref))
    for name in ref:
        close(ours[name], ref[name], name)


class LoraLinear(torch.nn.Module):
    def __init__(self, base, a, b, scale):
        super().__init__()
        self.base, self.scale = base, scale
        self.a, self.b = torch.nn.Parameter(torch.from_numpy(a)), torch.nn.Parameter(torch.from_numpy(b))

    def forward(self, x):
        return self.base(x) + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(x, self.a), self.b)


@pytest.mark.slow
def test_lora_loss_and_grads_match_torch(models):
    model, cfg, params = models
    lora = init_lora(cfg, jax.random.key(1), rank=4)
    # B starts at zero (no effect, no gradient into A): give it values so both factors are exercised.
    lora = jax.tree.map(lambda a: a if a.shape[0] == 4 else 0.05 * jax.random.normal(jax.random.key(a.size), a.shape),
                        lora)
    scale = 8 / 4
    wrapped = {}
    for part, layers in (("backbone", model.backbone_model.layers), ("decoder", model.depth_decoder.model.layers)):
        for i, layer in enumerate(layers):
            for t, ab in lora[part][i].items():
                parent = layer.self_attn if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else layer.mlp
                mod = LoraLinear(getattr(parent, t), np.asarray(ab["a"]).copy(), np.asarray(ab["b"]).copy(), scale)
                setattr(parent, t, mod)
                wrapped[(part, i, t)] = (parent, mod)
    batch, hf_labels = make_batch(seed=1)
    model.zero_grad()
    try:
        out = hf_loss(model, batch, hf_labels)
        out.loss.backward()
    finally:  # the module fixture's model gets its plain projections back
        for (_, _, t), (parent, mod) in wrapped.items():
            setattr(parent, t, mod.base)

    f = lambda lo, b: csm_loss(params, cfg, b, lora=lo, lora_scale=scale)  # noqa: E731
    (loss, _), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(lora, batch)
    assert abs(float(loss) - out.loss.item()) <= 1e-5 * abs(out.loss.item())
    assert set(target_rows(cfg.backbone)) == set(lora["backbone"][0])
    for (part, i, t), (_, mod) in wrapped.items():
        close(np.asarray(grads[part][i][t]["a"]), mod.a.grad.numpy(), f"{part}.{i}.{t}.a")
        close(np.asarray(grads[part][i][t]["b"]), mod.b.grad.numpy(), f"{part}.{i}.{t}.b")
