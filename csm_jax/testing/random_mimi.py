"""Random Mimi checkpoints in the real file layouts, built with the PyTorch references.

The moshi 0.2.2 model is built exactly as `moshi.models.loaders.get_mimi` does, then given weights that
exercise what a trained file has: random positive EMA codebook statistics scaled to the latents so that
codes vary across frames and codebooks, and layer scales far from their 0.01 init. Needs torch and moshi
(the test extra; moshi==0.2.2 installed with --no-deps).
"""

from __future__ import annotations

import numpy as np

from csm_jax.testing import reference
from csm_jax.testing.inputs import speech_like

MOSHI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"  # the file's name in kyutai/moshiko-pytorch-bf16


def build_moshi_mimi(seed: int = 0):
    """moshi's MimiModel as released (32 codebooks, eval mode), random weights from `seed`."""
    torch = reference("torch")
    reference("moshi")
    from moshi.models import loaders
    from moshi.models.compression import MimiModel
    from moshi.modules import SEANetDecoder, SEANetEncoder, transformer
    from moshi.quantization import SplitResidualVectorQuantizer

    torch.manual_seed(seed)
    encoder = SEANetEncoder(**loaders._seanet_kwargs)
    decoder = SEANetDecoder(**loaders._seanet_kwargs)
    enc_tr = transformer.ProjectedTransformer(device="cpu", **loaders._transformer_kwargs)
    dec_tr = transformer.ProjectedTransformer(device="cpu", **loaders._transformer_kwargs)
    quantizer = SplitResidualVectorQuantizer(**loaders._quantizer_kwargs)
    model = MimiModel(encoder, decoder, quantizer, channels=1, sample_rate=loaders.SAMPLE_RATE,
                      frame_rate=loaders.FRAME_RATE, encoder_frame_rate=loaders.SAMPLE_RATE / encoder.hop_length,
                      causal=True, resample_method="conv", encoder_transformer=enc_tr, decoder_transformer=dec_tr)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
                p.copy_(torch.empty_like(p).uniform_(0.05, 0.6, generator=g))
        # Codewords spread like the latents the encoder really produces at each stage (per-channel mean and
        # spread of the residual left by the previous stages), so codes vary across frames and codebooks and
        # every stage has codewords at its residual's scale, as in a trained RVQ.
        x = torch.from_numpy(speech_like(24000 * 8, seed=seed + 2))[None, None]
        z = model._encode_to_unquantized_latent(x)
        for rvq in (model.quantizer.rvq_first, model.quantizer.rvq_rest):
            r = rvq.input_proj(z)[0].T  # (frames, 256)
            for layer in rvq.vq.layers:
                cb = layer._codebook
                emb = r.mean(0) + r.std(0) * torch.randn(cb.embedding_sum.shape, generator=g)
                usage = torch.empty_like(cb.cluster_usage).uniform_(0.5, 2.0, generator=g)
                cb.cluster_usage.copy_(usage)
                cb.embedding_sum.copy_(emb * usage[:, None])
                cb._initialized.fill_(1.0)
                r = r - cb.embedding[torch.cdist(r, cb.embedding).argmin(-1)]
    model.set_num_codebooks(32)
    return model


def save_moshi_layout(model, path) -> None:
    """Kyutai's file layout (a moshi state dict in one safetensors file)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    reference("safetensors.torch").save_file(sd, str(path))


def moshi_to_hf_tensors(sd: dict) -> dict:
    """Kyutai layout -> transformers' kyutai/mimi layout, written from transformers' convert script's rules."""
    rules = [("conv.conv.conv", "conv"), ("convtr.convtr.convtr", "conv"), ("conv.conv", "conv"),
             ("convtr.convtr", "conv"), ("quantizer.rvq_first.vq", "quantizer.semantic_residual_vector_quantizer"),
             ("quantizer.rvq_first", "quantizer.semantic_residual_vector_quantizer"),
             ("quantizer.rvq_rest.vq", "quantizer.acoustic_residual_vector_quantizer"),
             ("quantizer.rvq_rest", "quantizer.acoustic_residual_vector_quantizer"), ("_codebook", "codebook"),
             ("_initialized", "initialized"), ("embedding_sum", "embed_sum"), ("encoder.model", "encoder.layers"),
             ("decoder.model", "decoder.layers"), ("encoder_transformer.transformer", "encoder_transformer"),
             ("decoder_transformer.transformer", "decoder_transformer"), ("linear1", "mlp.fc1"),
             ("linear2", "mlp.fc2"), ("self_attn.out_proj", "self_attn.o_proj"), ("norm1", "input_layernorm"),
             ("norm2", "post_attention_layernorm"), ("layer_scale_1", "self_attn_layer_scale"),
             ("layer_scale_2", "mlp_layer_scale")]

    def permute(w, n=8, hd=64):
        d = w.shape[1]
        return w.reshape(n, hd // 2, 2, d).transpose(0, 2, 1, 3).reshape(n * hd, d)

    out = {}
    for k, v in sd.items():
        v = np.asarray(v)
        if k.endswith("self_attn.in_proj_weight"):
            base = k[: -len("in_proj_weight")]
            for old, new in rules:
                base = base.replace(old, new)
            out[base + "q_proj.weight"] = permute(v[:512])
            out[base + "k_proj.weight"] = permute(v[512:1024])
            out[base + "v_proj.weight"] = v[1024:].copy()
            continue
        for old, new in rules:
            k = k.replace(old, new)
        out[k] = v
    return out


def rounded_copy(model, dtype):
    """A copy of a moshi Mimi whose parameters and buffers are rounded to `dtype` (torch's rounding) and kept in
    float32: the reference for a checkpoint saved in that dtype. The cached codebooks are dropped so moshi
    derives them again from the rounded statistics."""
    import copy

    out = copy.deepcopy(model)
    out.load_state_dict({k: v.to(dtype).float() for k, v in model.state_dict().items()})
    for module in out.modules():
        if hasattr(module, "embedding_sum"):
            module.register_buffer("_embedding", None, persistent=False)
    return out
