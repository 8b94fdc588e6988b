"""LoRA adapters for both CSM transformers: W x + (alpha / r) · B (A x) on chosen projections.

Targets use transformers' (and peft's) projection names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj,
down_proj. Our weights fuse q|k|v (`wqkv`) and gate|up (`w13`), so an adapter covers its rows of the fused
weight. Adapters are a plain pytree {"backbone": [layer], "decoder": [layer]}, a layer being
{target: {"a": (r, in), "b": (out, r)}}; A starts uniform(+-1/sqrt(in)) and B at zero (peft's init), so a
fresh adapter leaves the model unchanged. `merge` folds them into the base weights (exact up to rounding).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from csm_jax.llama import LlamaConfig, linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_rows(cfg: LlamaConfig) -> dict:
    """target -> (our fused weight name, first row, row count, input width)."""
    D, N, K, H, M = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
    return {"q_proj": ("wqkv", 0, N * H, D), "k_proj": ("wqkv", N * H, K * H, D),
            "v_proj": ("wqkv", (N + K) * H, K * H, D), "o_proj": ("wo", 0, D, N * H),
            "gate_proj": ("w13", 0, M, D), "up_proj": ("w13", M, M, D), "down_proj": ("w2", 0, D, M)}


def check_targets(targets) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target(s) {bad or '(none given)'}; choose among {', '.join(TARGETS)}")
    return targets


def init_lora(cfg, key, rank: int, targets=TARGETS, dtype=jnp.float32, parts=("backbone", "decoder")) -> dict:
    """Fresh adapters for every layer of the backbone and the depth decoder (`cfg` a CsmConfig); a part
    left out of `parts` gets None (no adapters: that transformer stays as it is)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    targets = check_targets(targets)
    out = {"backbone": None, "decoder": None}
    for part, lcfg in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        if part not in parts:
            continue
        rows = target_rows(lcfg)
        layers = []
        for _ in range(lcfg.num_layers):
            layer = {}
            for t in targets:
                _, _, n_out, n_in = rows[t]
                key, sub = jax.random.split(key)
                bound = 1.0 / n_in ** 0.5
                layer[t] = {"a": jax.random.uniform(sub, (rank, n_in), dtype, -bound, bound),
                            "b": jnp.zeros((n_out, rank), dtype)}
            layers.append(layer)
        out[part] = layers
    return out


def project(cfg: LlamaConfig, x, w, name: str, layer_lora: dict | None, scale: float):
    """linear(x, w) for our weight `name` plus the adapters that cover its rows."""
    y = linear(x, w)
    if not layer_lora:
        return y
    for t, (wname, start, n, _) in target_rows(cfg).items():
        if wname == name and t in layer_lora:
            a, b = layer_lora[t]["a"].astype(x.dtype), layer_lora[t]["b"].astype(x.dtype)
            y = y.at[..., start:start + n].add(scale * linear(linear(x, a), b))
    return y


def merge(cfg, params: dict, lora: dict, scale: float) -> dict:
    """Base parameters with the adapters folded in: W[rows] += scale · B A (in fp32, cast back)."""
    out = dict(params)
    for part, lcfg in (("backbone", cfg.backbone), ("decoder", cfg.decoder)):
        if not lora.get(part):
            continue
        rows = target_rows(lcfg)
        layers = []
        for p, ad in zip(params[part]["layers"], lora[part]):
            p = dict(p)
            for t, ab in ad.items():
                wname, start, n, _ = rows[t]
                w = p[wname]
                delta = scale * (ab["b"].astype(jnp.float32) @ ab["a"].astype(jnp.float32))
                p[wname] = w.at[start:start + n].set((w[start:start + n].astype(jnp.float32) + delta).astype(w.dtype))
            layers.append(p)
        out[part] = dict(params[part], layers=layers)
    return out


def lora_info(lora: dict) -> tuple[int, tuple[str, ...]]:
    """(rank, targets) of an adapter tree."""
    layer = (lora.get("backbone") or lora["decoder"])[0]
    first = next(iter(layer.values()))
    return int(first["a"].shape[0]), tuple(layer)
