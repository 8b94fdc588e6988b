"""CSM: a Llama backbone that predicts codebook 0 and a small Llama depth decoder for codebooks 1..31.

Rows (Sesame's csm/models.py): every backbone position is a row of 33 columns, tokens (.., 33) with a
mask (.., 33): columns 0..31 are the audio codes of codebooks 0..31, column 32 the text token. A row's
embedding is the masked sum of audio_embed[code + 2051 * codebook] and text_embed[token].

One frame, from the backbone's final hidden state h of the last row:
  c0 = sample(h · c0_head)
  depth decoder over [proj(h), proj(audio_embed[c0])] at positions 0, 1 (fresh 32-slot cache), then
  c_i = sample(dec_out · audio_head[i-1]) and proj(audio_embed[c_i + 2051 i]) is fed at position i+1
  the frame's row [c0..c31 | no text] is fed to the backbone, giving the next h.
A frame whose 32 codes are all 0 is end-of-speech: it is not emitted nor fed back (csm/generator.py) and
its row stops. Codes 2048..2050 exist in the 2051-entry audio vocabulary but not in Mimi's 2048-entry
codebooks: they are masked before sampling, never emitted.

Everything per row is an array (positions, sampling settings, PRNG keys, frame caps), so one compiled
function serves any mix of requests; `generate_frames` runs K frames in one dispatch (lax.scan) with the
31 codebooks in an inner lax.scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from csm_jax import llama
from csm_jax.llama import LlamaConfig, linear
from csm_jax.sampling import sample

AUDIO_VOCAB = 2051
MIMI_CODES = 2048


@dataclass(frozen=True)
class CsmConfig:
    backbone: LlamaConfig
    decoder: LlamaConfig
    text_vocab_size: int = 128_256
    audio_vocab_size: int = AUDIO_VOCAB
    num_codebooks: int = 32

    @property
    def max_seq_len(self) -> int:
        return self.backbone.max_seq_len

    @staticmethod
    def csm_1b() -> "CsmConfig":
        """sesame/csm-1b: llama-1B backbone, llama-100M depth decoder (torchtune llama3_2 flavours)."""
        return CsmConfig(backbone=LlamaConfig(16, 2048, 32, 8, 64, 8192),
                         decoder=LlamaConfig(4, 1024, 8, 2, 128, 8192, max_seq_len=32))

    @staticmethod
    def tiny() -> "CsmConfig":
        """For tests: real head dims, GQA ratios and RoPE scaling, small widths and depths."""
        return CsmConfig(backbone=LlamaConfig(2, 512, 8, 2, 64, 256),
                         decoder=LlamaConfig(2, 256, 2, 1, 128, 256, max_seq_len=32), text_vocab_size=128_256)

    @staticmethod
    def from_hf_config(c: dict) -> "CsmConfig":
        """From a checkpoint's config.json: transformers' CsmConfig, or Sesame's hub-mixin ModelArgs."""
        if "backbone_flavor" in c and "hidden_size" not in c:
            if (c["backbone_flavor"], c["decoder_flavor"]) != ("llama-1B", "llama-100M"):
                raise ValueError(f"unsupported CSM flavours {c['backbone_flavor']} / {c['decoder_flavor']}")
            return CsmConfig.csm_1b()
        dd = c.get("depth_decoder_config")
        if dd is None:
            raise ValueError("config.json has neither depth_decoder_config (transformers) nor backbone_flavor (Sesame)")
        backbone = LlamaConfig.from_hf(c)
        decoder = LlamaConfig.from_hf(dd)
        # Sesame's models always use Llama-3 scaling; a config without it is read as torchtune's defaults.
        if backbone.rope_scaling is None:
            backbone = _replace(backbone, rope_scaling=(32.0, 1.0, 4.0, 8192.0))
        if decoder.rope_scaling is None:
            decoder = _replace(decoder, rope_scaling=(32.0, 1.0, 4.0, 8192.0))
        return CsmConfig(backbone=backbone, decoder=_replace(decoder, max_seq_len=32),
                         text_vocab_size=c.get("text_vocab_size", 128_256),
                         audio_vocab_size=c.get("vocab_size", AUDIO_VOCAB), num_codebooks=c.get("num_codebooks", 32))


def _replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def param_shapes(cfg: CsmConfig) -> dict:
    D, Dd, V, C = cfg.backbone.dim, cfg.decoder.dim, cfg.audio_vocab_size, cfg.num_codebooks
    return {"text_embed": (cfg.text_vocab_size, D), "audio_embed": (C * V, D), "c0_head": (V, D),
            "projection": (Dd, D), "audio_head": [(V, Dd) for _ in range(C - 1)],
            "backbone": llama.param_shapes(cfg.backbone), "decoder": llama.param_shapes(cfg.decoder)}


def init_params(cfg: CsmConfig, key, dtype=jnp.float32) -> dict:
    """Random parameters (for tests and benchmarks): normal(0, 0.02), norms at 1."""
    shapes = param_shapes(cfg)
    leaves, tree = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    out = [jnp.ones(s, dtype) if len(s) == 1 else (0.02 * jax.random.normal(k, s)).astype(dtype)
           for k, s in zip(keys, leaves)]
    return jax.tree.unflatten(tree, out)


# ------------------------------------------------------------------------------------------------- state


@partial(jax.tree_util.register_dataclass, data_fields=["cache", "h", "pos", "done", "n_frames", "max_frames",
                                                        "temperature", "topk", "key"], meta_fields=[])
@dataclass
class GenState:
    """Per-row generation state. cache: backbone ring (capacity max_seq_len); h (B, D): final hidden of the
    last row fed; pos (B,): next position; done (B,): row finished (EOS, frame cap, or never started)."""

    cache: dict
    h: jax.Array
    pos: jax.Array
    done: jax.Array
    n_frames: jax.Array
    max_frames: jax.Array
    temperature: jax.Array
    topk: jax.Array
    key: jax.Array = field(default=None)

    @staticmethod
    def create(cfg: CsmConfig, batch_size: int, dtype=jnp.float32, max_seq_len: int | None = None) -> "GenState":
        B = batch_size
        return GenState(cache=llama.init_cache(cfg.backbone, B, max_seq_len or cfg.max_seq_len, dtype),
                        h=jnp.zeros((B, cfg.backbone.dim), dtype), pos=jnp.zeros((B,), jnp.int32),
                        done=jnp.ones((B,), bool), n_frames=jnp.zeros((B,), jnp.int32),
                        max_frames=jnp.zeros((B,), jnp.int32), temperature=jnp.full((B,), 0.9, jnp.float32),
                        topk=jnp.full((B,), 50, jnp.int32), key=jax.random.split(jax.random.key(0), B))


@partial(jax.jit, donate_argnums=(0,))
def reset_rows(state: GenState, rows) -> GenState:
    """Rows where `rows` is True become empty (no context, position 0, done)."""
    r1 = rows[:, None]
    cache = dict(state.cache, pos=jnp.where(r1, -1, state.cache["pos"]))
    return GenState(cache=cache, h=jnp.where(r1, 0, state.h), pos=jnp.where(rows, 0, state.pos),
                    done=state.done | rows, n_frames=jnp.where(rows, 0, state.n_frames), max_frames=state.max_frames,
                    temperature=state.temperature, topk=state.topk, key=state.key)


@partial(jax.jit, donate_argnums=(0,))
def set_sampling(state: GenState, rows, temperature, topk, seeds, max_frames) -> GenState:
    """For rows where `rows` is True: sampling settings, a fresh PRNG stream from `seeds` (B,) int, a frame
    cap, and the row is (re)started: n_frames 0, not done. temperature 0 means greedy."""
    keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
    keep = lambda new, old: jnp.where(rows, new, old)  # noqa: E731
    return GenState(cache=state.cache, h=state.h, pos=state.pos, done=keep(max_frames <= 0, state.done),
                    n_frames=keep(0, state.n_frames), max_frames=keep(max_frames.astype(jnp.int32), state.max_frames),
                    temperature=keep(temperature.astype(jnp.float32), state.temperature),
                    topk=keep(topk.astype(jnp.int32), state.topk),
                    key=jax.vmap(lambda r, n, o: jax.lax.select(r, n, o))(rows, keys, state.key))


# ------------------------------------------------------------------------------------------------ forward


def embed_rows(cfg: CsmConfig, params, tokens, mask):
    """tokens (B, T, 33) int32, mask (B, T, 33) bool -> (B, T, D): masked sum of audio and text embeddings."""
    offsets = jnp.arange(cfg.num_codebooks, dtype=jnp.int32) * cfg.audio_vocab_size
    audio = params["audio_embed"][tokens[..., :-1] + offsets]  # (B, T, C, D)
    x = jnp.einsum("btcd,btc->btd", audio, mask[..., :-1].astype(audio.dtype))
    text = params["text_embed"][tokens[..., -1]]
    return x + text * mask[..., -1:].astype(text.dtype)


def attention_window(cfg: CsmConfig, last_position: int) -> int:
    """The static attention window for a call whose positions stay below `last_position`: a power of two
    (>= 128) or the whole cache. Bucketed so that a growing conversation compiles only a few times."""
    w = 128
    while w < last_position:
        w *= 2
    return min(w, cfg.max_seq_len)


PREFILL_CHUNK = 128
PREFILL_STEP = 32


def prefill_pieces(cfg: CsmConfig, tokens: np.ndarray, mask: np.ndarray, lengths, first_position: int = 0):
    """Cuts prompts (B, S, 33) into the calls that `prefill` (or `prefill_slot`) runs one after another:
    yields (tokens (B, P, 33), mask (B, P, 33), lengths (B,) int32, window). Pieces have PREFILL_CHUNK rows;
    the last one is the rest rounded up to a multiple of PREFILL_STEP. A prompt of any length then computes
    fewer than PREFILL_STEP padding rows (a 279-row history computes 288, not 512) and compiles one program
    per piece size (four) and attention window, not one per prompt length. `first_position`: the position
    the first row lands at (the highest of the rows touched)."""
    lengths = np.asarray(lengths, np.int32)
    longest = int(lengths.max()) if lengths.size else 0
    B, C = tokens.shape[0], tokens.shape[2]
    start = 0
    while start < longest:
        P = min(PREFILL_CHUNK, -(-(longest - start) // PREFILL_STEP) * PREFILL_STEP)
        t, m = np.zeros((B, P, C), np.int32), np.zeros((B, P, C), bool)
        piece_t, piece_m = tokens[:, start:start + P], mask[:, start:start + P]
        t[:, :piece_t.shape[1]], m[:, :piece_m.shape[1]] = piece_t, piece_m
        yield (jnp.asarray(t), jnp.asarray(m), jnp.asarray(np.clip(lengths - start, 0, P)),
               attention_window(cfg, first_position + start + P))
        start += P


@partial(jax.jit, static_argnums=(1, 7), donate_argnums=(2,))
def prefill(params, cfg: CsmConfig, state: GenState, tokens, mask, lengths, rows, window: int | None = None) -> GenState:
    """Appends rows to the selected rows' caches at their current positions.

    tokens (B, S, 33), mask (B, S, 33), lengths (B,) valid rows per batch row (the rest is padding),
    rows (B,) which batch rows to touch. The hidden state of each one's last new row becomes its `h`.
    Positions must stay below the cache capacity (max_seq_len); the caller checks the budget.
    `window` (static, optional): every position of this call is below it (see `attention_window`).
    """
    S = tokens.shape[1]
    idx = jnp.arange(S, dtype=jnp.int32)
    valid = rows[:, None] & (idx[None] < lengths[:, None])
    pos = jnp.where(valid, state.pos[:, None] + idx[None], -1)
    x = embed_rows(cfg, params, tokens, mask).astype(state.h.dtype)
    h, cache = llama.forward(cfg.backbone, params["backbone"], x, pos, state.cache, window)
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    touched = rows & (lengths > 0)
    return GenState(cache=cache, h=jnp.where(touched[:, None], last, state.h),
                    pos=jnp.where(touched, state.pos + lengths, state.pos), done=state.done,
                    n_frames=state.n_frames, max_frames=state.max_frames, temperature=state.temperature,
                    topk=state.topk, key=state.key)


@partial(jax.jit, static_argnums=(1, 7), donate_argnums=(2,))
def prefill_slot(params, cfg: CsmConfig, state: GenState, tokens, mask, length, slot,
                 window: int | None = None) -> GenState:
    """`prefill` for one batch row: tokens (1, S, 33), mask (1, S, 33), length () valid rows, slot () int.
    Only that row's cache is read, computed and written (an insert costs one row's prefill, not the batch's)."""
    sub = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, slot, 1, axis=0), state)
    sub = prefill(params, cfg, sub, tokens, mask, jnp.reshape(length, (1,)), jnp.ones(1, bool), window)
    return jax.tree.map(lambda a, b: jax.lax.dynamic_update_slice_in_dim(a, b, slot, axis=0), state, sub)


def backbone_logits(params, h):
    """Codebook-0 logits (B, 2051) in fp32 from final hidden states (B, D)."""
    return linear(h, params["c0_head"], jnp.float32)


def depth_decoder(cfg: CsmConfig, params, h, c0, sample_fn):
    """Codebooks 1..31 for each row, given the backbone hidden h (B, D) and codebook 0 (B,).

    `sample_fn(logits (B, V), codebook index) -> codes (B,)`. Returns (codes (B, C-1), logits (B, C-1, V)).
    """
    B = h.shape[0]
    dcfg, V, heads = cfg.decoder, cfg.audio_vocab_size, params["audio_head"]
    cache = llama.init_cache(dcfg, B, cfg.num_codebooks, h.dtype)
    x = linear(jnp.stack([h, params["audio_embed"][c0]], 1), params["projection"])  # (B, 2, Dd)
    pos = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (B, 2))
    if B == 1 and jax.default_backend() == "cpu":
        # XLA:CPU runs a 2-row matmul 2-3x slower than two 1-row ones: feed the two positions one by one.
        out, cache = llama.forward(dcfg, params["decoder"], x[:, :1], pos[:, :1], cache)
        out, cache = llama.forward(dcfg, params["decoder"], x[:, 1:], pos[:, 1:], cache)
    else:
        out, cache = llama.forward(dcfg, params["decoder"], x, pos, cache)
    logits = linear(out[:, -1], heads[0], jnp.float32)
    c1 = sample_fn(logits, 1)
    # One branch per head: each reads its own weight buffer (indexing a stacked (31, V, Dd) array copied the
    # 8 MB slice every codebook before the matmul read it).
    head_fns = [lambda o, w=w: linear(o, w, jnp.float32) for w in heads[1:]]

    def step(carry, i):
        cache, prev = carry
        x = linear(params["audio_embed"][prev + (i - 1) * V][:, None], params["projection"])
        out, cache = llama.forward(dcfg, params["decoder"], x, jnp.full((B, 1), i, jnp.int32), cache)
        lg = jax.lax.switch(i - 2, head_fns, out[:, 0])
        c = sample_fn(lg, i)
        return (cache, c), (c, lg)

    _, (cs, lgs) = jax.lax.scan(step, (cache, c1), jnp.arange(2, cfg.num_codebooks))
    codes = jnp.concatenate([c1[:, None], cs.T], 1)
    return codes, jnp.concatenate([logits[:, None], jnp.moveaxis(lgs, 0, 1)], 1)


def _frame(params, cfg: CsmConfig, window, state: GenState, _):
    B = state.h.shape[0]
    keys = jax.vmap(jax.random.split)(state.key)  # (B, 2) keys
    frame_key, next_key = keys[:, 0], keys[:, 1]

    def sample_fn(logits, i):
        ks = jax.vmap(jax.random.fold_in, in_axes=(0, None))(frame_key, i)
        return sample(logits, ks, state.temperature, state.topk, MIMI_CODES)

    c0 = sample_fn(backbone_logits(params, state.h), 0)
    rest, _ = depth_decoder(cfg, params, state.h, c0, sample_fn)
    codes = jnp.concatenate([c0[:, None], rest], 1)  # (B, C)
    eos = jnp.all(codes == 0, axis=-1)
    valid = ~state.done & ~eos
    row = jnp.concatenate([codes, jnp.zeros((B, 1), jnp.int32)], 1)[:, None]
    mask = jnp.concatenate([jnp.ones((B, 1, cfg.num_codebooks), bool), jnp.zeros((B, 1, 1), bool)], -1)
    x = embed_rows(cfg, params, row, mask).astype(state.h.dtype)
    pos = jnp.where(valid, state.pos, -1)[:, None]
    h, cache = llama.forward(cfg.backbone, params["backbone"], x, pos, state.cache, window)
    n_frames = state.n_frames + valid
    full = state.pos + valid >= state.cache["pos"].shape[1]  # the ring would wrap: stop at max_seq_len rows
    new = GenState(cache=cache, h=jnp.where(valid[:, None], h[:, 0], state.h), pos=state.pos + valid,
                   done=state.done | eos | (n_frames >= state.max_frames) | full, n_frames=n_frames,
                   max_frames=state.max_frames, temperature=state.temperature, topk=state.topk, key=next_key)
    return new, (codes, valid)


@partial(jax.jit, static_argnums=(1, 3, 4), donate_argnums=(2,))
def generate_frames(params, cfg: CsmConfig, state: GenState, num_frames: int, window: int | None = None):
    """Runs `num_frames` frames for every row on the device. -> (state, frames (B, F, C) int32, valid (B, F)).

    A row that is done produces invalid frames and leaves its cache untouched. The state is donated.
    `window` (static, optional): all positions written in this call are below it (see `attention_window`),
    so attention reads only that many cache slots.
    """
    state, (codes, valid) = jax.lax.scan(partial(_frame, params, cfg, window), state, None, length=num_frames)
    return state, jnp.moveaxis(codes, 0, 1), valid.T


@partial(jax.jit, static_argnums=(1, 4, 5), donate_argnums=(2,))
def generate_frames_rows(params, cfg: CsmConfig, state: GenState, rows, num_frames: int, window: int | None = None):
    """`generate_frames` for the batch rows `rows` (R,) int only (distinct), the others untouched: when few
    rows are busy, the step costs R rows' compute, not the whole batch's. -> (state, frames (R, F, C), valid (R, F))."""
    sub = jax.tree.map(lambda a: a[rows], state)
    sub, (codes, valid) = jax.lax.scan(partial(_frame, params, cfg, window), sub, None, length=num_frames)
    state = jax.tree.map(lambda a, b: a.at[rows].set(b), state, sub)
    return state, jnp.moveaxis(codes, 0, 1), valid.T
