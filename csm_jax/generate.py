"""Speech from text with CSM: the module pipelines import.

    from csm_jax.generate import Generator
    gen = Generator("sesame/csm-1b")                       # or a local folder
    audio = gen.generate(["Hello there.", "How are you?"], speakers=[0, 1], seeds=[1, 2])   # list of (L,) 24 kHz
    for chunk in gen.stream("A longer answer, spoken as it is generated.", speaker=1):
        play(chunk)                                        # (1920 * frames_per_call,) float32 chunks

Utterances in one `generate` call run as one batch on the device, each with its own prompt length, seed,
stop and frame cap; a row gets the same codes it would get alone. Contexts are lists of `Segment`s (earlier
turns with their audio or Mimi codes), placed before the utterance as Sesame's generator does.
No watermark is applied (Sesame's reference adds a SilentCipher watermark as post-processing).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from csm_jax import csm
from csm_jax.audio import check_audio
from csm_jax.checkpoints import load_csm
from csm_jax.mimi import (decode, decode_step, encode, init_decoder_state, load_mimi, mimi_params_from_tensors)
from csm_jax.quantize import quantize_csm
from csm_jax.text import FRAME_SAMPLES, Segment, Tokenizer, build_prompt

FRAME_MS = 80


def bucket(n: int, lo: int = 16) -> int:
    """Next power of two >= n (>= lo): padded lengths keep the number of compilations small."""
    b = lo
    while b < n:
        b *= 2
    return b


def stream_decode(mimi: dict, dec, frames: np.ndarray):
    """Streaming Mimi decode of one stream's new frames (F, 32) -> (decoder state, 24 kHz audio (1920 F,)),
    with one transfer to the host for all of them."""
    pcm = []
    for f in frames:
        dec, out = decode_step(mimi, dec, jnp.asarray(f[None]))
        pcm.append(out[0])
    return dec, np.asarray(jnp.concatenate(pcm)) if pcm else np.zeros(0, np.float32)


def _as_list(x, n, name):
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name}: expected {n} values (one per text), got {len(x)}")
        return list(x)
    return [x] * n


class Generator:
    """A loaded CSM + Mimi + tokenizer, ready to speak."""

    def __init__(self, checkpoint: str = "sesame/csm-1b", mimi: str | None = None, tokenizer: str | None = None,
                 dtype=None, frames_per_call: int = 8, quantize: str | None = None):
        self.ckpt = load_csm(checkpoint, dtype)
        self.ckpt.params = quantize_csm(self.ckpt.params, quantize)  # "int8": csm_jax.quantize; None: as loaded
        self.cfg, self.params = self.ckpt.config, self.ckpt.params
        if self.ckpt.codec_tensors is not None and mimi is None:
            _, self.mimi = mimi_params_from_tensors(self.ckpt.codec_tensors, f"{self.ckpt.source} (codec_model.*)")
        elif mimi is not None:
            _, self.mimi = load_mimi(mimi)
        else:
            try:
                _, self.mimi = load_mimi("kyutai/mimi")
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{self.ckpt.source} holds no Mimi weights (no codec_model.*: Sesame's "
                                        f"layout), so Mimi comes from kyutai/mimi, but {e}. Offline, pass a local "
                                        "Mimi checkpoint (file or folder) as `mimi` (--mimi)") from e
        tok = tokenizer or self.ckpt.tokenizer_file
        if tok is None:
            raise FileNotFoundError(f"{checkpoint} has no tokenizer.json: pass the Llama-3 tokenizer.json "
                                    "(e.g. from meta-llama/Llama-3.2-1B) as `tokenizer`")
        self.tokenizer = Tokenizer(tok)
        self.frames_per_call = frames_per_call

    @classmethod
    def from_parts(cls, cfg: csm.CsmConfig, params: dict, mimi_params: dict, tokenizer: str,
                   frames_per_call: int = 8, quantize: str | None = None) -> "Generator":
        """A generator over parameters already in memory (random weights for benchmarks, fine-tuned ones)."""
        gen = cls.__new__(cls)
        gen.ckpt, gen.cfg, gen.params, gen.mimi = None, cfg, quantize_csm(params, quantize), mimi_params
        gen.tokenizer, gen.frames_per_call = Tokenizer(tokenizer), frames_per_call
        return gen

    # ----------------------------------------------------------------------------------------- helpers

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """24 kHz mono (L,) -> Mimi codes (32, ceil(L / 1920)). Lengths of whole frames compile once per
        power-of-two bucket; give whole frames (pad with silence) where many lengths come by."""
        audio = check_audio(audio, "context audio")
        if audio.size % FRAME_SAMPLES:  # a partial last frame: Mimi pads it its own way, so encode as it is
            return np.asarray(encode(self.mimi, jnp.asarray(audio[None])))[0]
        # Whole frames: padded to a bucketed length (few compilations); the encoder is causal, so the
        # trailing zeros leave the codes of the real frames exactly as they are.
        T = audio.size // FRAME_SAMPLES
        padded = np.zeros(bucket(T, 4) * FRAME_SAMPLES, np.float32)
        padded[:audio.size] = audio
        return np.asarray(encode(self.mimi, jnp.asarray(padded[None])))[0, :, :T]

    def decode_codes(self, codes: np.ndarray) -> np.ndarray:
        """Mimi codes (32, T) -> 24 kHz audio (1920 T,)."""
        T = codes.shape[1]
        if T == 0:
            return np.zeros(0, np.float32)
        padded = np.zeros((32, bucket(T, 4)), np.int32)
        padded[:, :T] = codes  # causal decoder: trimming the padded tail gives exactly the unpadded audio
        return np.asarray(decode(self.mimi, jnp.asarray(padded[None])))[0, :T * FRAME_SAMPLES]

    def context_codes(self, context: Sequence[Segment]) -> list[Segment]:
        """The segments with any audio Mimi-encoded into codes (encode voice prompts once, reuse the result)."""
        out = []
        for seg in context:
            if seg.codes is None and seg.audio is not None:
                seg = Segment(seg.speaker, seg.text, None, self.encode_audio(seg.audio))
            out.append(seg)
        return out

    def _start(self, texts, speakers, contexts, seeds, temperature, topk, max_audio_ms, drop_oldest, pinned=0):
        n = len(texts)
        if n == 0:
            raise ValueError("no texts given")
        speakers, contexts = _as_list(speakers, n, "speakers"), _as_list(contexts, n, "contexts")
        seeds, temps = _as_list(seeds, n, "seeds"), _as_list(temperature, n, "temperature")
        topks, caps = _as_list(topk, n, "topk"), _as_list(max_audio_ms, n, "max_audio_ms")
        frames = []
        for ms in caps:
            if not ms or ms < FRAME_MS:
                raise ValueError(f"max_audio_ms must be at least {FRAME_MS} (one frame), got {ms}")
            frames.append(int(ms // FRAME_MS))
        prompts = [build_prompt(self.tokenizer, self.context_codes(ctx or []), spk, text, f,
                                self.cfg.max_seq_len, drop_oldest, pinned)
                   for text, spk, ctx, f in zip(texts, speakers, contexts, frames)]
        longest = max(len(p[0]) for p in prompts)
        tokens = np.zeros((n, longest, 33), np.int32)
        mask = np.zeros((n, longest, 33), bool)
        for i, (t, m, _) in enumerate(prompts):
            tokens[i, :len(t)], mask[i, :len(t)] = t, m
        rows = jnp.ones(n, bool)
        st = csm.GenState.create(self.cfg, n, self.params["c0_head"].dtype)
        for t, m, lengths, window in csm.prefill_pieces(self.cfg, tokens, mask, [len(p[0]) for p in prompts]):
            st = csm.prefill(self.params, self.cfg, st, t, m, lengths, rows, window)
        self._next_position = longest  # every row's next position is below this
        return csm.set_sampling(st, rows, jnp.array(temps, jnp.float32), jnp.array(topks, jnp.int32),
                                jnp.array(seeds, jnp.int32), jnp.array(frames, jnp.int32))

    def _frames(self, st):
        K = self.frames_per_call
        window = csm.attention_window(self.cfg, self._next_position + K)
        self._next_position += K
        return csm.generate_frames(self.params, self.cfg, st, K, window)

    # ------------------------------------------------------------------------------------------- API

    def generate_codes(self, texts: Sequence[str], speakers=0, contexts=None, seeds=0, temperature=0.9, topk=50,
                       max_audio_ms=10_000, drop_oldest: bool = False, pinned: int = 0) -> list[np.ndarray]:
        """Mimi codes (32, T_i) for each text, generated as one batch. With `drop_oldest`, context segments
        after the first `pinned` ones are dropped, oldest first, when the prompt would not fit."""
        st = self._start(list(texts), speakers, contexts, seeds, temperature, topk, max_audio_ms, drop_oldest,
                         pinned)
        out = [[] for _ in texts]
        while not bool(st.done.all()):
            st, frames, valid = self._frames(st)
            frames, valid = np.asarray(frames), np.asarray(valid)
            for i in range(len(texts)):
                out[i].extend(frames[i][valid[i]])
        return [np.stack(o, 1).astype(np.int32) if o else np.zeros((32, 0), np.int32) for o in out]

    def generate(self, texts: Sequence[str] | str, speakers=0, contexts=None, seeds=0, temperature=0.9, topk=50,
                 max_audio_ms=10_000, drop_oldest: bool = False, return_codes: bool = False):
        """24 kHz float32 audio for each text (a list; one array if `texts` is a string).

        speakers, contexts (lists of Segment), seeds, temperature (0 = greedy), topk and max_audio_ms are
        one value for all or a list with one per text. With `return_codes`, returns (audio, codes) pairs.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        codes = self.generate_codes(texts, speakers, contexts if not single or contexts is None else [contexts],
                                    seeds, temperature, topk, max_audio_ms, drop_oldest)
        result = [(self.decode_codes(c), c) if return_codes else self.decode_codes(c) for c in codes]
        return result[0] if single else result

    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] | None = None, seed: int = 0,
               temperature: float = 0.9, topk: int = 50, max_audio_ms: int = 10_000,
               drop_oldest: bool = False) -> Iterator[np.ndarray]:
        """Yields 24 kHz audio chunks as frames are generated (streaming Mimi decode): the chunks concatenate to
        what `generate` returns for the same arguments."""
        st = self._start([text], speaker, [context or []], seed, temperature, topk, max_audio_ms, drop_oldest)
        dec = init_decoder_state(self.mimi, 1)
        while not bool(st.done.all()):
            st, frames, valid = self._frames(st)
            dec, audio = stream_decode(self.mimi, dec, np.asarray(frames)[0][np.asarray(valid)[0]])
            if audio.size:
                yield audio
