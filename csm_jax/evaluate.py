"""How far one set of CSM parameters strays from another (e.g. int8 weights from the model they came from).

`greedy_agreement` compares the two models' greedy codes and logits frame by frame on one stream, both
reading the same context: the reference's own greedy codes are fed back to both (teacher forcing), so every
code is compared in the same place. The stream is built from csm's own pieces (prefill, codebook-0 logits,
the depth decoder, a frame's row embedding); only the choice of what to feed back is this module's.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax import csm, llama
from csm_jax.csm import MIMI_CODES, CsmConfig, GenState


def greedy_agreement(cfg: CsmConfig, ref_params: dict, test_params: dict, num_frames: int, prompt_rows: int = 16,
                     seed: int = 0) -> dict:
    """How far `test_params` (e.g. quantized) stray from `ref_params` on one greedy stream of `num_frames`
    frames after a random text prompt. Both read the same context: the reference's own greedy codes are fed
    back to both (teacher forcing), so every one of the num_frames * 32 codes is compared in the same place.

    Returns {"code_agreement": fraction of the greedy codes that are equal, "c0_agreement", "depth_agreement",
    "c0_logit_error" and "depth_logit_error": max |test - ref| over all logits / std of the reference logits,
    "c0_logit_rms" and "depth_logit_rms": the same with the rms difference, "first_divergence": the frame at
    which free-running greedy generation with `test_params` first emits a different code (num_frames if never)}.
    """
    C = cfg.num_codebooks
    prompt = np.random.default_rng(seed).integers(0, cfg.text_vocab_size, prompt_rows).astype(np.int32)
    none = jnp.zeros((num_frames, C), jnp.int32)
    ref_codes, ref_c0, ref_depth = map(np.asarray, _greedy_run(ref_params, cfg, prompt, none, jnp.array(False)))
    codes, c0, depth = map(np.asarray, _greedy_run(test_params, cfg, prompt, jnp.asarray(ref_codes), jnp.array(True)))
    free_codes = np.asarray(_greedy_run(test_params, cfg, prompt, none, jnp.array(False))[0])
    diverged = np.nonzero((free_codes != ref_codes).any(-1))[0]
    greedy = np.concatenate([c0[:, None, :MIMI_CODES], depth[..., :MIMI_CODES]], 1).argmax(-1)

    def err(a, b):
        return float(np.abs(a - b).max() / b.std()), float(np.sqrt(np.mean((a - b) ** 2)) / b.std())

    (c0_max, c0_rms), (d_max, d_rms) = err(c0, ref_c0), err(depth, ref_depth)
    return {"frames": num_frames, "code_agreement": float((greedy == ref_codes).mean()),
            "c0_agreement": float((greedy[:, 0] == ref_codes[:, 0]).mean()),
            "depth_agreement": float((greedy[:, 1:] == ref_codes[:, 1:]).mean()),
            "c0_logit_error": c0_max, "c0_logit_rms": c0_rms, "depth_logit_error": d_max, "depth_logit_rms": d_rms,
            "first_divergence": int(diverged[0]) if diverged.size else num_frames}


@partial(jax.jit, static_argnums=(1,))
def _greedy_run(params, cfg: CsmConfig, prompt, forced, teacher_forced):
    """One stream: prompt (P,) text tokens, then F = len(forced) greedy frames, each fed back the codes
    `forced` (F, C) when `teacher_forced` (a traced bool: one compilation serves both), else its own.
    -> (greedy codes (F, C), c0 logits (F, V), depth logits (F, C - 1, V)).

    Unlike generation (csm._frame), every frame is fed back, an all-zero one too: the comparison runs all
    F frames whatever the codes are."""
    C, P, F = cfg.num_codebooks, prompt.shape[0], forced.shape[0]
    dtype = params["c0_head"].dtype
    pick = lambda lg: jnp.argmax(lg[..., :MIMI_CODES], -1).astype(jnp.int32)  # noqa: E731
    feed = lambda lg, f: jnp.where(teacher_forced, f, pick(lg))  # noqa: E731

    def frame(state: GenState, f):
        lg0 = csm.backbone_logits(params, state.h)
        c0 = feed(lg0, f[None, 0])
        rest, lgs = csm.depth_decoder(cfg, params, state.h, c0, lambda lg, i: feed(lg, f[None, i]))
        greedy = jnp.concatenate([pick(lg0)[:, None], pick(lgs)], 1)
        x = csm.embed_frame(cfg, params, jnp.concatenate([c0[:, None], rest], 1), dtype)
        h, cache = llama.forward(cfg.backbone, params["backbone"], x, state.pos[:, None], state.cache)
        return state.replace(cache=cache, h=h[:, 0], pos=state.pos + 1), (greedy[0], lg0[0], lgs[0])

    tokens = jnp.zeros((1, P, C + 1), jnp.int32).at[0, :, -1].set(prompt)
    mask = jnp.zeros((1, P, C + 1), bool).at[..., -1].set(True)
    state = csm.prefill(params, cfg, GenState.create(cfg, 1, dtype, max_seq_len=P + F), tokens, mask,
                        jnp.full((1,), P, jnp.int32))
    return jax.lax.scan(frame, state, forced)[1]
