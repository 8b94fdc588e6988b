"""Mimi weights from the files people download, in both layouts, into our parameter dict.

Layouts (detected from the key names, never guessed):
  moshi    Kyutai's original `tokenizer-e351c8d8-checkpoint125.safetensors`: moshi 0.2.2 module names,
           fused `in_proj_weight` with q/k rows in interleaved-RoPE order, EMA codebooks.
  hf       transformers' `kyutai/mimi` `model.safetensors` (flat names of transformers' convert script),
           q/k rows permuted to half-split RoPE order; also the `codec_model.*` part of a transformers
           CSM checkpoint once the prefix is stripped.
Our parameters keep the interleaved order, so hf q/k rows are un-permuted exactly. Convolutions become
(K, C_in/groups, C_out) kernels; transposed convolutions (K, C_in, C_out), each tap a matmul.
Files may store fp32, bf16 or fp16: the parameters are built as numpy arrays in the stored dtype (the
codebooks derived in float32) and cast once, at the end, to the one compute dtype (float32 by default).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax.checkpoints import (CheckpointError, StrictTensors, compute_dtype, read_config,
                                 read_safetensors_files, resolve_files)
from csm_jax.mimi.model import MimiConfig
from csm_jax.mimi.seanet import DEC_STRIDES, ENC_STRIDES

D, HEADS, HEAD_DIM, FF = 512, 8, 64, 2048
N_LAYERS, CODEBOOK, CODE_DIM, N_Q = 8, 2048, 256, 32
# SEANet channels: encoder 64 -> 128 -> 256 -> 512 -> 1024, decoder the reverse.
_ENC_CH = (64, 128, 256, 512, 1024)


def _conv(w):  # torch Conv1d (out, in/groups, k) -> (k, in/groups, out)
    return np.ascontiguousarray(np.transpose(w, (2, 1, 0)))


def _convtr(w, groups=1):  # torch ConvTranspose1d (in, out/groups, k) -> (k, in, out), or (k, 1, channels) depthwise
    if groups == 1:
        return np.ascontiguousarray(np.transpose(w, (2, 0, 1)))
    return np.ascontiguousarray(np.transpose(w, (2, 1, 0)))


def unpermute_rope(w, n_heads=HEADS, head_dim=HEAD_DIM):
    """Rows in half-split order (transformers) -> interleaved order (original). Inverse of convert_*'s permute."""
    d_in = w.shape[1]
    return w.reshape(n_heads, 2, head_dim // 2, d_in).transpose(0, 2, 1, 3).reshape(n_heads * head_dim, d_in)


def _names(layout: str):
    """Maps our parameter slots to file keys for one layout."""
    moshi = layout == "moshi"
    n = {}
    enc, dec = ("encoder.model", "decoder.model") if moshi else ("encoder.layers", "decoder.layers")
    cv = ".conv.conv" if moshi else ".conv"
    n["encoder.in"] = f"{enc}.0{cv}"
    n["encoder.out"] = f"{enc}.14{cv}"
    n["decoder.in"] = f"{dec}.0{cv}"
    n["decoder.out"] = f"{dec}.14{cv}"
    for i in range(4):
        n[f"encoder.res{i}.conv1"] = f"{enc}.{1 + 3 * i}.block.1{cv}"
        n[f"encoder.res{i}.conv2"] = f"{enc}.{1 + 3 * i}.block.3{cv}"
        n[f"encoder.down{i}"] = f"{enc}.{3 + 3 * i}{cv}"
        n[f"decoder.up{i}"] = f"{dec}.{2 + 3 * i}" + (".convtr.convtr" if moshi else ".conv")
        n[f"decoder.res{i}.conv1"] = f"{dec}.{3 + 3 * i}.block.1{cv}"
        n[f"decoder.res{i}.conv2"] = f"{dec}.{3 + 3 * i}.block.3{cv}"
    n["downsample"] = "downsample.conv.conv.conv.weight" if moshi else "downsample.conv.weight"
    n["upsample"] = "upsample.convtr.convtr.convtr.weight" if moshi else "upsample.conv.weight"
    if moshi:
        n["q.first"], n["q.rest"] = "quantizer.rvq_first", "quantizer.rvq_rest"
        n["books"], n["book"], n["sum"] = "vq.layers", "_codebook", "embedding_sum"
        n["flag"] = "_initialized"
    else:
        n["q.first"] = "quantizer.semantic_residual_vector_quantizer"
        n["q.rest"] = "quantizer.acoustic_residual_vector_quantizer"
        n["books"], n["book"], n["sum"], n["flag"] = "layers", "codebook", "embed_sum", "initialized"
    return n


def detect_layout(keys) -> str:
    keys = set(keys)
    if "encoder.model.0.conv.conv.weight" in keys:
        return "moshi"
    if "encoder.layers.0.conv.weight" in keys:
        return "hf"
    if any(k.startswith("codec_model.") for k in keys):
        raise CheckpointError("this is a transformers CSM checkpoint: strip the 'codec_model.' prefix "
                              "(csm_jax.checkpoints.load_csm does) or load the CSM checkpoint instead")
    if any(k.startswith(("backbone.", "backbone_model.")) for k in keys):
        raise CheckpointError("this is a CSM checkpoint without Mimi weights; load Mimi from 'kyutai/mimi'")
    if any(k.startswith("encoder.encoder_seanet.") for k in keys):
        raise CheckpointError("Mimi keys in transformers' in-memory naming (encoder.encoder_seanet...) are not "
                              "a released layout; save with transformers' save_pretrained")
    sample = ", ".join(sorted(keys)[:3])
    raise CheckpointError(f"not a Mimi checkpoint: neither 'encoder.model.0.conv.conv.weight' (Kyutai's layout) "
                          f"nor 'encoder.layers.0.conv.weight' (transformers' layout) is present; keys start: {sample}")


def _conv_params(st, key, shape, transpose=_conv):
    return {"w": transpose(st.take(f"{key}.weight", shape)),
            "b": st.take(f"{key}.bias", (shape[0] if transpose is _conv else shape[1],))}


def _transformer(st, prefix, layout):
    layers = []
    for i in range(N_LAYERS):
        k = f"{prefix}.layers.{i}"
        if layout == "moshi":
            w = st.take(f"{k}.self_attn.in_proj_weight", (3 * D, D))
            wq, wk, wv = w[:D], w[D:2 * D], w[2 * D:]
            wo = st.take(f"{k}.self_attn.out_proj.weight", (D, D))
            n1, n2, f1, f2 = f"{k}.norm1", f"{k}.norm2", f"{k}.linear1", f"{k}.linear2"
            ls1, ls2 = f"{k}.layer_scale_1.scale", f"{k}.layer_scale_2.scale"
        else:
            wq = unpermute_rope(st.take(f"{k}.self_attn.q_proj.weight", (D, D)))
            wk = unpermute_rope(st.take(f"{k}.self_attn.k_proj.weight", (D, D)))
            wv = st.take(f"{k}.self_attn.v_proj.weight", (D, D))
            wo = st.take(f"{k}.self_attn.o_proj.weight", (D, D))
            n1, n2 = f"{k}.input_layernorm", f"{k}.post_attention_layernorm"
            f1, f2 = f"{k}.mlp.fc1", f"{k}.mlp.fc2"
            ls1, ls2 = f"{k}.self_attn_layer_scale.scale", f"{k}.mlp_layer_scale.scale"
        lp = {
            "wq": wq.T, "wk": wk.T, "wv": wv.T, "wo": wo.T,
            "norm1": {"scale": st.take(f"{n1}.weight", (D,)), "bias": st.take(f"{n1}.bias", (D,))},
            "norm2": {"scale": st.take(f"{n2}.weight", (D,)), "bias": st.take(f"{n2}.bias", (D,))},
            "w1": st.take(f"{f1}.weight", (FF, D)).T, "w2": st.take(f"{f2}.weight", (D, FF)).T,
            "ls1": st.take(ls1, (D,)), "ls2": st.take(ls2, (D,)),
        }
        layers.append(lp)
    return layers


def _quantizer(st, n):
    def books(prefix, count):
        out = []
        for s in range(count):
            k = f"{prefix}.{n['books']}.{s}.{n['book']}"
            # In float32 whatever the file stores: a bf16/fp16 quotient would round once more.
            total = st.take(f"{k}.{n['sum']}", (CODEBOOK, CODE_DIM)).astype(np.float32)
            usage = st.take(f"{k}.cluster_usage", (CODEBOOK,)).astype(np.float32)
            st.take(f"{k}.{n['flag']}", (1,))
            out.append(total / np.maximum(usage, np.float32(1e-5))[:, None])  # EuclideanCodebook.embedding
        return np.stack(out)

    q = {}
    for name, count in (("first", 1), ("rest", N_Q - 1)):
        prefix = n[f"q.{name}"]
        q[name] = {
            "in": st.take(f"{prefix}.input_proj.weight", (CODE_DIM, D, 1))[:, :, 0].T,
            "out": st.take(f"{prefix}.output_proj.weight", (D, CODE_DIM, 1))[:, :, 0].T,
            "codebooks": books(prefix, count),
        }
    return q


def mimi_params_from_tensors(tensors: dict[str, np.ndarray], source: str, dtype=None):
    """Our Mimi parameters from a dict of checkpoint tensors in either layout and any float dtype (strict),
    cast to `compute_dtype(dtype, "mimi")` (None: float32). -> (MimiConfig, params)."""
    dtype = compute_dtype(dtype, "mimi")
    layout = detect_layout(tensors.keys())
    st = StrictTensors(tensors, source)
    n = _names(layout)
    ch = _ENC_CH
    enc = {
        "in": _conv_params(st, n["encoder.in"], (ch[0], 1, 7)),
        "res": [{"conv1": _conv_params(st, n[f"encoder.res{i}.conv1"], (ch[i] // 2, ch[i], 3)),
                 "conv2": _conv_params(st, n[f"encoder.res{i}.conv2"], (ch[i], ch[i] // 2, 1))} for i in range(4)],
        "down": [_conv_params(st, n[f"encoder.down{i}"], (ch[i + 1], ch[i], 2 * s)) for i, s in enumerate(ENC_STRIDES)],
        "out": _conv_params(st, n["encoder.out"], (D, ch[4], 3)),
    }
    dch = ch[::-1]  # 1024, 512, 256, 128, 64
    dec = {
        "in": _conv_params(st, n["decoder.in"], (dch[0], D, 7)),
        "up": [_conv_params(st, n[f"decoder.up{i}"], (dch[i], dch[i + 1], 2 * s), transpose=_convtr)
               for i, s in enumerate(DEC_STRIDES)],
        "res": [{"conv1": _conv_params(st, n[f"decoder.res{i}.conv1"], (dch[i + 1] // 2, dch[i + 1], 3)),
                 "conv2": _conv_params(st, n[f"decoder.res{i}.conv2"], (dch[i + 1], dch[i + 1] // 2, 1))}
                for i in range(4)],
        "out": _conv_params(st, n["decoder.out"], (1, dch[4], 3)),
    }
    prefix_tr = "{}_transformer.transformer" if layout == "moshi" else "{}_transformer"
    params = {
        "encoder": enc,
        "encoder_transformer": _transformer(st, prefix_tr.format("encoder"), layout),
        "downsample": {"w": _conv(st.take(n["downsample"], (D, D, 4)))},
        "quantizer": _quantizer(st, n),
        "upsample": {"w": _convtr(st.take(n["upsample"], (D, 1, 4)), groups=D)},
        "decoder_transformer": _transformer(st, prefix_tr.format("decoder"), layout),
        "decoder": dec,
    }
    st.finish()
    # The one cast: every parameter, whatever its stored dtype, to the compute dtype.
    return MimiConfig(), jax.tree.map(lambda x: jnp.asarray(np.ascontiguousarray(x), dtype), params)


def _check_hf_config(config: dict | None, source: str) -> None:
    if not config:
        return
    expected = {"sampling_rate": 24000, "hidden_size": 512, "num_filters": 64, "upsampling_ratios": [8, 6, 5, 4],
                "codebook_size": 2048, "codebook_dim": 256, "num_hidden_layers": 8, "num_attention_heads": 8,
                "sliding_window": 250, "num_semantic_quantizers": 1}
    bad = {k: (config[k], v) for k, v in expected.items() if k in config and config[k] != v}
    if bad:
        detail = ", ".join(f"{k}={got} (supported: {want})" for k, (got, want) in bad.items())
        raise CheckpointError(f"{source}: unsupported Mimi config: {detail}")


def load_mimi(id_or_path: str | os.PathLike = "kyutai/mimi", dtype=None):
    """Loads Mimi from a hub repo id, a local folder or a .safetensors file stored in fp32, bf16 or fp16: Mimi's
    own checkpoint in either layout, or a transformers CSM checkpoint (its codec_model.* part).

    `dtype`: the compute dtype of the parameters (and so of streaming state and activations): None = float32,
    or "bfloat16". -> (MimiConfig, params)."""
    files = resolve_files(id_or_path, ["*.safetensors", "config.json"])
    weights = [f for f in files if f.name != "config.json"]
    if not weights:
        raise FileNotFoundError(f"no .safetensors file found in {id_or_path}")
    if len(weights) > 1 and any(f.name.startswith("tokenizer-") for f in weights):
        weights = [f for f in weights if f.name.startswith("tokenizer-")]
    config = read_config(files)
    tensors, origin = read_safetensors_files(weights)
    source = str(weights[0]) if len(weights) == 1 else f"{id_or_path} ({len(weights)} files)"
    codec = {k[len("codec_model."):]: v for k, v in tensors.items() if k.startswith("codec_model.")}
    if codec:  # a transformers CSM checkpoint: its Mimi is codec_model.*, described by codec_config
        tensors, source = codec, f"{source} (codec_model.*)"
        config = (config or {}).get("codec_config")
    _check_hf_config(config, str(id_or_path))
    return mimi_params_from_tensors(tensors, source, dtype)
