"""CSM: a Llama backbone that predicts codebook 0 and a small Llama depth decoder for codebooks 1..31.

Rows (Sesame's csm/models.py): every backbone position is a row of 33 columns, tokens (.., 33) with a
mask (.., 33): columns 0..31 are the audio codes of codebooks 0..31, column 32 the text token. A row's
embedding is the masked sum of audio_embed[code + 2051 * codebook] and text_embed[token].

One frame, from the backbone's final hidden state h of the last row:
  c0 = sample(h · c0_head)
  depth decoder over [proj(h), proj(audio_embed[c0])] at positions 0, 1 (fresh 32-slot cache; every row is
  at the same position, so it runs `llama.forward_shared`: in-place cache writes, no positions stored), then
  c_i = sample(dec_out · audio_head[i-1]) and proj(audio_embed[c_i + 2051 i]) is fed at position i+1
  the frame's row [c0..c31 | no text] is fed to the backbone, giving the next h.
A frame whose 32 codes are all 0 is end-of-speech: it is not emitted nor fed back (csm/generator.py) and
its row stops. Codes 2048..2050 exist in the 2051-entry audio vocabulary but not in Mimi's 2048-entry
codebooks: they are masked before sampling, never emitted.

A batch entry of the generation state is a slot: one stream with its own cache, position, sampling settings,
PRNG key and frame cap, all arrays, so one compiled function serves any mix of requests. The state carries
everything the loop needs: attention windows are chosen on the device from the positions, never by the host.
`generate_frames` runs F frames in one dispatch (lax.scan) with the 31 codebooks in an inner lax.scan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from csm_jax import llama
from csm_jax.llama import LlamaConfig, linear
from csm_jax.sampling import codebook_noise, sample

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


@struct.dataclass
class GenState:
    """Generation state of B slots (independent streams). cache: backbone ring (capacity max_seq_len); h (B, D):
    final hidden of the last row fed; pos (B,): next position (the attention window follows from it);
    done (B,): finished (EOS, frame cap, full cache, or never started). A pytree (flax.struct): `replace`
    gives a copy with some fields changed. Its logical axes, for a mesh: csm_jax.sharding.STATE_AXES."""

    cache: dict
    h: jax.Array
    pos: jax.Array
    done: jax.Array
    n_frames: jax.Array
    max_frames: jax.Array
    temperature: jax.Array
    topk: jax.Array
    key: jax.Array = None

    @staticmethod
    def create(cfg: CsmConfig, batch_size: int, dtype=jnp.float32, max_seq_len: int | None = None) -> "GenState":
        B = batch_size
        return GenState(cache=llama.init_cache(cfg.backbone, B, max_seq_len or cfg.max_seq_len, dtype),
                        h=jnp.zeros((B, cfg.backbone.dim), dtype), pos=jnp.zeros((B,), jnp.int32),
                        done=jnp.ones((B,), bool), n_frames=jnp.zeros((B,), jnp.int32),
                        max_frames=jnp.zeros((B,), jnp.int32), temperature=jnp.full((B,), 0.9, jnp.float32),
                        topk=jnp.full((B,), 50, jnp.int32), key=jax.random.split(jax.random.key(0), B))


def _per_slot(state: GenState, slots) -> GenState:
    """The state of the slots `slots` (R,) (batch indices): per-slot fields gathered, the cache left whole
    (the model reads and writes only those slots of it)."""
    if slots is None:
        return state
    return jax.tree.map(lambda x: x[slots], state.replace(cache=None)).replace(cache=state.cache)


def _put_slots(state: GenState, sub: GenState, slots) -> GenState:
    """Writes the per-slot fields of `sub` (R slots) back at `slots`; the cache is `sub`'s."""
    if slots is None:
        return sub
    put = lambda a, b: a.at[slots].set(b)  # noqa: E731
    return jax.tree.map(put, state.replace(cache=None), sub.replace(cache=None)).replace(cache=sub.cache)


@partial(jax.jit, donate_argnums=(0,))
def reset_slots(state: GenState, slots) -> GenState:
    """The slots `slots` (R,) int become empty: no context, position 0, done. Other slots are untouched."""
    cache = dict(state.cache, pos=state.cache["pos"].at[slots].set(-1))
    return state.replace(cache=cache, h=state.h.at[slots].set(0), pos=state.pos.at[slots].set(0),
                         done=state.done.at[slots].set(True), n_frames=state.n_frames.at[slots].set(0))


@partial(jax.jit, donate_argnums=(0,))
def stop_slots(state: GenState, slots) -> GenState:
    """The slots `slots` (R,) int are done: they generate no more (their cache is kept)."""
    return state.replace(done=state.done.at[slots].set(True))


@partial(jax.jit, donate_argnums=(0,))
def rewind_slots(state: GenState, slots, rows) -> GenState:
    """The slots `slots` (R,) int forget their last `rows` (R,) rows: their position moves back, and the
    next rows written overwrite those cells before any later position can attend to them."""
    return state.replace(pos=state.pos.at[slots].add(-rows))


@partial(jax.jit, donate_argnums=(0,))
def set_sampling(state: GenState, slots, temperature, topk, seeds, max_frames) -> GenState:
    """For the slots `slots` (R,) int: sampling settings (R,), a fresh PRNG stream from `seeds` (R,), a
    frame cap, and the row is (re)started: n_frames 0, not done. temperature 0 means greedy. Seeds are taken
    modulo 2**32 (they seed a uint32 key); callers that promise distinct seeds check the range."""
    keys = jax.vmap(jax.random.key)(seeds.astype(jnp.uint32))
    put = lambda a, b: a.at[slots].set(b)  # noqa: E731
    return state.replace(done=put(state.done, max_frames <= 0), n_frames=put(state.n_frames, 0),
                         max_frames=put(state.max_frames, max_frames.astype(jnp.int32)),
                         temperature=put(state.temperature, temperature.astype(jnp.float32)),
                         topk=put(state.topk, topk.astype(jnp.int32)), key=put(state.key, keys))


# ------------------------------------------------------------------------------------------------ forward


@jax.named_scope("embed_rows")
def embed_rows(cfg: CsmConfig, params, tokens, mask):
    """tokens (B, T, 33) int32, mask (B, T, 33) bool -> (B, T, D): masked sum of audio and text embeddings."""
    offsets = jnp.arange(cfg.num_codebooks, dtype=jnp.int32) * cfg.audio_vocab_size
    audio = params["audio_embed"][tokens[..., :-1] + offsets]  # (B, T, C, D)
    x = jnp.einsum("btcd,btc->btd", audio, mask[..., :-1].astype(audio.dtype))
    text = params["text_embed"][tokens[..., -1]]
    return x + text * mask[..., -1:].astype(text.dtype)


PREFILL_CHUNK = 128
PREFILL_STEP = 32


def prefill_pieces(tokens: np.ndarray, mask: np.ndarray, lengths, put=jax.device_put):
    """Cuts prompts (R, S, 33) into the calls that `prefill` runs one after another: yields (tokens (R, P, 33),
    mask (R, P, 33), lengths (R,) int32). Pieces have PREFILL_CHUNK rows; the last one is the rest rounded up
    to a multiple of PREFILL_STEP. A prompt of any length then computes fewer than PREFILL_STEP padding rows
    (a 279-row history computes 288, not 512) and compiles one program per piece size (four) and batch.
    `put` moves each host array to the device(s) (e.g. replicated on a mesh): one transfer per array."""
    lengths = np.asarray(lengths, np.int32)
    longest = int(lengths.max()) if lengths.size else 0
    R, C = tokens.shape[0], tokens.shape[2]
    start = 0
    while start < longest:
        P = piece_rows(longest - start)
        t, m = np.zeros((R, P, C), np.int32), np.zeros((R, P, C), bool)
        piece_t, piece_m = tokens[:, start:start + P], mask[:, start:start + P]
        t[:, :piece_t.shape[1]], m[:, :piece_m.shape[1]] = piece_t, piece_m
        # device_put, not jnp.asarray: a plain transfer, never a (tiny) compiled program per new shape
        yield put(t), put(m), put(np.clip(lengths - start, 0, P).astype(np.int32))
        start += P


def piece_rows(remaining: int) -> int:
    """Rows of the next prefill piece when `remaining` prompt rows are left (see `prefill_pieces`)."""
    return min(PREFILL_CHUNK, -(-remaining // PREFILL_STEP) * PREFILL_STEP)


def piece_sizes() -> list[int]:
    """Every piece size `prefill_pieces` makes (for compiling ahead of time)."""
    return list(range(PREFILL_STEP, PREFILL_CHUNK + 1, PREFILL_STEP))


@partial(jax.jit, static_argnums=(1,), donate_argnums=(2,))
def prefill(params, cfg: CsmConfig, state: GenState, tokens, mask, lengths, slots=None) -> GenState:
    """Appends prompt rows to the slots `slots` (R,) int (batch indices; default: all, R = B) at their current
    positions: tokens (R, P, 33), mask (R, P, 33), lengths (R,) valid rows each (the rest is padding). The
    hidden state of each one's last new row becomes its `h`. Only those slots of the cache are read and
    written: inserting a request costs its own prefill, not the batch's. Positions must stay below the
    cache capacity (max_seq_len); the caller checks the budget.
    """
    sub = _per_slot(state, slots)
    P = tokens.shape[1]
    idx = jnp.arange(P, dtype=jnp.int32)
    valid = idx[None] < lengths[:, None]
    pos = jnp.where(valid, sub.pos[:, None] + idx[None], -1)
    x = embed_rows(cfg, params, tokens, mask).astype(sub.h.dtype)
    h, cache = llama.forward(cfg.backbone, params["backbone"], x, pos, sub.cache, slots)
    last = jnp.take_along_axis(h, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    touched = lengths > 0
    sub = sub.replace(cache=cache, h=jnp.where(touched[:, None], last, sub.h), pos=sub.pos + lengths)
    return _put_slots(state, sub, slots)


@jax.named_scope("c0_head")
def backbone_logits(params, h):
    """Codebook-0 logits (B, 2051) in fp32 from final hidden states (B, D)."""
    return linear(h, params["c0_head"], jnp.float32)


@jax.named_scope("depth_decoder")
def depth_decoder(cfg: CsmConfig, params, h, c0, sample_fn):
    """Codebooks 1..31 for each row, given the backbone hidden h (B, D) and codebook 0 (B,).

    `sample_fn(logits (B, V), codebook index) -> codes (B,)`. Returns (codes (B, C-1), logits (B, C-1, V)).
    """
    B = h.shape[0]
    dcfg, V, heads = cfg.decoder, cfg.audio_vocab_size, params["audio_head"]
    # Every row is at the same position (codebook) at every step: the lockstep path, cell = position.
    kv = llama.init_shared_cache(dcfg, B, cfg.num_codebooks, h.dtype)
    table = llama.rope_table(dcfg, cfg.num_codebooks)
    forward = partial(llama.forward_shared, dcfg, params["decoder"])
    with jax.named_scope("projection"):
        x = linear(jnp.stack([h, params["audio_embed"][c0]], 1), params["projection"])  # (B, 2, Dd)
    if B == 1 and jax.default_backend() == "cpu":
        # XLA:CPU runs a 2-row matmul 2-3x slower than two 1-row ones: feed the two positions one by one.
        out, kv = forward(x[:, :1], 0, kv, table)
        out, kv = forward(x[:, 1:], 1, kv, table)
    else:
        out, kv = forward(x, 0, kv, table)
    with jax.named_scope("heads"):
        logits = linear(out[:, -1], heads[0], jnp.float32)
    c1 = sample_fn(logits, 1)
    # One branch per head: each reads its own weight buffer (indexing a stacked (31, V, Dd) array copied the
    # 8 MB slice every codebook before the matmul read it).
    head_fns = [lambda o, w=w: linear(o, w, jnp.float32) for w in heads[1:]]

    def step(carry, i):
        kv, prev = carry
        with jax.named_scope("projection"):
            x = linear(params["audio_embed"][prev + (i - 1) * V][:, None], params["projection"])
        out, kv = forward(x, i, kv, table)
        with jax.named_scope("heads"):
            lg = jax.lax.switch(i - 2, head_fns, out[:, 0])
        c = sample_fn(lg, i)
        return (kv, c), (c, lg)

    _, (cs, lgs) = jax.lax.scan(step, (kv, c1), jnp.arange(2, cfg.num_codebooks))
    codes = jnp.concatenate([c1[:, None], cs.T], 1)
    return codes, jnp.concatenate([logits[:, None], jnp.moveaxis(lgs, 0, 1)], 1)


def embed_frame(cfg: CsmConfig, params, codes, dtype):
    """A frame's codes (B, C) as the backbone row [c0..c31 | no text], embedded: (B, 1, D) in `dtype`."""
    B = codes.shape[0]
    row = jnp.concatenate([codes, jnp.zeros((B, 1), jnp.int32)], 1)[:, None]
    mask = jnp.concatenate([jnp.ones((B, 1, cfg.num_codebooks), bool), jnp.zeros((B, 1, 1), bool)], -1)
    return embed_rows(cfg, params, row, mask).astype(dtype)


def _frame(params, cfg: CsmConfig, slots, state: GenState, _):
    keys = jax.vmap(jax.random.split)(state.key)  # (B, 2) keys
    frame_key, next_key = keys[:, 0], keys[:, 1]

    # The 32 draws' noise is made once per frame, in one batched generation, not at each sequential step.
    noise = codebook_noise(frame_key, cfg.num_codebooks, cfg.audio_vocab_size)  # (B, C, V)

    def sample_fn(logits, i):
        return sample(logits, noise[:, i], state.temperature, state.topk, MIMI_CODES)

    c0 = sample_fn(backbone_logits(params, state.h), 0)
    rest, _ = depth_decoder(cfg, params, state.h, c0, sample_fn)
    codes = jnp.concatenate([c0[:, None], rest], 1)  # (B, C)
    eos = jnp.all(codes == 0, axis=-1)
    valid = ~state.done & ~eos
    x = embed_frame(cfg, params, codes, state.h.dtype)
    pos = jnp.where(valid, state.pos, -1)[:, None]
    h, cache = llama.forward(cfg.backbone, params["backbone"], x, pos, state.cache, slots)
    n_frames = state.n_frames + valid
    full = state.pos + valid >= state.cache["pos"].shape[1]  # the ring would wrap: stop at max_seq_len rows
    new = state.replace(cache=cache, h=jnp.where(valid[:, None], h[:, 0], state.h), pos=state.pos + valid,
                        done=state.done | eos | (n_frames >= state.max_frames) | full, n_frames=n_frames,
                        key=next_key)
    return new, (codes, valid)


def run_frames(params, cfg: CsmConfig, state: GenState, num_frames: int, slots=None):
    """`num_frames` frames for the slots `slots` (R,) int (batch indices; default: all), the others untouched
    (traceable; `generate_frames` is its jitted form). -> (state, frames (R, F, C) int32, valid (R, F)).

    A slot that is done produces invalid frames and leaves its cache untouched. When few slots are busy, only
    they are computed: the step costs R slots' compute, not the whole batch's.
    """
    sub = _per_slot(state, slots)
    sub, (codes, valid) = jax.lax.scan(partial(_frame, params, cfg, slots), sub, None, length=num_frames)
    return _put_slots(state, sub, slots), jnp.moveaxis(codes, 0, 1), valid.T


generate_frames = partial(jax.jit, static_argnums=(1, 3), donate_argnums=(2,))(run_frames)
