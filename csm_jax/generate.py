"""Speech from text with CSM: the one entry to generation in Python.

    from csm_jax.generate import Generator
    gen = Generator("sesame/csm-1b")                       # or a local folder, or a loaded csm_jax.bundle.ModelBundle
    audio = gen.generate(["Hello there.", "How are you?"], speakers=[0, 1], seeds=[1, 2])   # list of (L,) 24 kHz
    for chunk in gen.stream("A longer answer, spoken as it is generated.", speaker=1):
        play(chunk)                                        # (1920 * frames_per_call,) float32 chunks
    with gen.driver(slots=8, max_queue=16) as driver:      # serving, conversations: a thread steps the engine
        driver.submit(Request("Hello."), sink)             # (csm_jax.driver, csm_jax.dialogue)

Utterances in one `generate` call run as one batch on the device, each with its own prompt length, seed,
stop and frame cap; a row gets the same codes it would get alone. Contexts are lists of `Segment`s (earlier
turns with their audio or Mimi codes), placed before the utterance as Sesame's generator does. Every call runs
on an engine of its own (csm_jax.engine) through its driver (csm_jax.driver); `gen.model` is the loaded model
(parameters, tokenizer, Mimi encode and decode).
No watermark is applied (Sesame's reference adds a SilentCipher watermark as post-processing).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from csm_jax.bundle import ModelBundle
from csm_jax.driver import Driver
from csm_jax.engine import FRAMES_PER_CALL, Engine
from csm_jax.request import Request
from csm_jax.text import Segment


def _as_list(x, n, name):
    if isinstance(x, (list, tuple)):
        if len(x) != n:
            raise ValueError(f"{name}: expected {n} values (one per text), got {len(x)}")
        return list(x)
    return [x] * n


class Generator:
    """A loaded model ready to speak: batches, streams and paragraphs, and drivers for serving."""

    def __init__(self, checkpoint: str | ModelBundle = "sesame/csm-1b", mimi: str | None = None,
                 tokenizer: str | None = None, dtype=None, frames_per_call: int = FRAMES_PER_CALL,
                 quantize: str | None = None, mesh=None):
        """`checkpoint`: a hub id or local folder (loaded here with `mimi`, `tokenizer`, `dtype`, `quantize`
        and `mesh`, see csm_jax.bundle), or a ModelBundle already loaded. `mesh`
        (csm_jax.sharding.make_mesh(), e.g. over jax.local_devices()): batches and streams run on all its
        devices, their slots split along "data". `frames_per_call`: frames per engine step."""
        if isinstance(checkpoint, ModelBundle):
            given = [name for name, v in (("mimi", mimi), ("tokenizer", tokenizer), ("dtype", dtype),
                                          ("quantize", quantize), ("mesh", mesh)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} given with a loaded model: pass them to ModelBundle instead")
            self.model = checkpoint
        else:
            self.model = ModelBundle(checkpoint, mimi, tokenizer, dtype, quantize, mesh)
        self.frames_per_call = frames_per_call

    @classmethod
    def from_parts(cls, cfg, params: dict, mimi_params: dict, tokenizer: str, frames_per_call: int = FRAMES_PER_CALL,
                   quantize: str | None = None, mesh=None) -> "Generator":
        """A generator over parameters already in memory (random weights for benchmarks, fine-tuned ones)."""
        return cls(ModelBundle.from_parts(cfg, params, mimi_params, tokenizer, quantize, mesh),
                   frames_per_call=frames_per_call)

    # ------------------------------------------------------------------------------------------- API

    def driver(self, slots: int, max_queue: int = 0, frames_per_call: int | None = None, **engine_kw) -> Driver:
        """A driver of a new engine of `slots` slots (on a mesh, a multiple of its "data" size: see
        `model.round_slots`) with `max_queue` requests allowed to wait for one. `engine_kw`: csm_jax.engine.Engine's
        (max_prefill, prefill_rows, schedule, clock). Run it in a thread (`with driver:`) for serving and
        conversations, or in the caller's thread (`driver.run()`)."""
        return Driver(Engine(self.model, slots, frames_per_call or self.frames_per_call, **engine_kw), max_queue)

    def requests(self, texts: Sequence[str], speakers=0, contexts=None, seeds=0, temperature=0.9, topk=50,
                 max_audio_ms=10_000, drop_oldest: bool = False) -> list[Request]:
        """One Request per text; every other argument is one value for all or a list with one per text."""
        n = len(texts)
        if n == 0:
            raise ValueError("no texts given")
        cols = [_as_list(v, n, name) for v, name in ((speakers, "speakers"), (contexts, "contexts"), (seeds, "seeds"),
                                                    (temperature, "temperature"), (topk, "topk"),
                                                    (max_audio_ms, "max_audio_ms"))]
        return [Request(t, spk, list(ctx or []), seed, temp, k, ms, drop_oldest)
                for t, spk, ctx, seed, temp, k, ms in zip(texts, *cols)]

    def run(self, requests: Sequence[Request]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Speaks every request as one batch on an engine of its own -> (24 kHz audio, codes (32, T)) each,
        the audio from the engine's streaming Mimi decoder (what `stream` yields). On a mesh the engine has
        the requests' count rounded up to a multiple of the "data" size (the spare slots stay idle)."""
        driver = self.driver(self.model.round_slots(len(requests)), max_prefill=len(requests))
        audio = [[] for _ in requests]
        codes = [[] for _ in requests]
        for i, r in enumerate(requests):
            driver.submit(r, lambda ev, i=i: (audio[i].append(ev.audio), codes[i].append(ev.codes)))
        driver.run()
        return [(np.concatenate(a), np.concatenate(c).T.astype(np.int32)) for a, c in zip(audio, codes)]

    def generate_codes(self, texts: Sequence[str], speakers=0, contexts=None, seeds=0, temperature=0.9, topk=50,
                       max_audio_ms=10_000, drop_oldest: bool = False) -> list[np.ndarray]:
        """Mimi codes (32, T_i) for each text, generated as one batch. With `drop_oldest`, context segments
        are dropped, oldest first, when the prompt would not fit."""
        reqs = self.requests(list(texts), speakers, contexts, seeds, temperature, topk, max_audio_ms, drop_oldest)
        return [c for _, c in self.run(reqs)]

    def generate(self, texts: Sequence[str] | str, speakers=0, contexts=None, seeds=0, temperature=0.9, topk=50,
                 max_audio_ms=10_000, drop_oldest: bool = False, return_codes: bool = False):
        """24 kHz float32 audio for each text (a list; one array if `texts` is a string).

        speakers, contexts (lists of Segment), seeds (0 .. 2**32 - 1), temperature (0 = greedy), topk and
        max_audio_ms are one value for all or a list with one per text. With `return_codes`, returns
        (audio, codes) pairs.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        reqs = self.requests(texts, speakers, contexts if not single or contexts is None else [contexts], seeds,
                             temperature, topk, max_audio_ms, drop_oldest)
        result = [pair if return_codes else pair[0] for pair in self.run(reqs)]
        return result[0] if single else result

    def generate_paragraphs(self, texts: Sequence[str], speaker: int = 0, context: Sequence[Segment] | None = None,
                            seeds=0, temperature: float = 0.9, topk: int = 50, max_audio_ms: int = 10_000,
                            batch_size: int = 4, on_done=None) -> list[np.ndarray]:
        """Mimi codes (32, T_i) for each text, spoken sentence by sentence (`split_sentences`) so a paragraph
        keeps one voice: each sentence is generated with the earlier ones in context, appended to the cache of
        a conversation slot (csm_jax.dialogue) rather than prefilled again. `context` (a voice prompt) stays
        pinned; when the 2048 positions fill up, the oldest sentences leave. Sentence r of text i uses seed
        seeds[i] + r. `batch_size` texts (on a mesh, rounded up to a multiple of its "data" size) are spoken
        at once on one engine, its driver's thread stepping it meanwhile; `on_done(i, codes)` is called as each
        text is finished."""
        from csm_jax.dialogue import Dialogue
        from csm_jax.text import split_sentences

        texts = list(texts)
        seeds = _as_list(seeds, len(texts), "seeds")
        sentences = [split_sentences(t) for t in texts]  # every text checked before any is generated
        context = self.model.context_codes(context or [])
        out: list[np.ndarray] = []
        with self.driver(self.model.round_slots(max(1, min(batch_size, len(texts))))) as driver:
            slots = driver.engine.slots
            for start in range(0, len(texts), slots):
                idx = list(range(start, min(start + slots, len(texts))))
                talks = {i: Dialogue(driver, context) for i in idx}
                made = {i: [] for i in idx}
                for r in range(max(len(sentences[i]) for i in idx)):
                    speaking = {i: talks[i].speak(sentences[i][r], speaker, seeds[i] + r, temperature, topk,
                                                  max_audio_ms) for i in idx if r < len(sentences[i])}
                    while speaking:  # the sentences generate together; their chunks are taken in turns
                        for i, chunks in list(speaking.items()):
                            if next(chunks, None) is None:
                                del speaking[i]
                                made[i].append(talks[i].segments[-1].codes)
                for i in idx:
                    talks[i].close()
                    codes = np.concatenate(made[i], axis=1)
                    out.append(codes)
                    if on_done is not None:
                        on_done(i, codes)
        return out

    def stream(self, text: str, speaker: int = 0, context: Sequence[Segment] | None = None, seed: int = 0,
               temperature: float = 0.9, topk: int = 50, max_audio_ms: int = 10_000,
               drop_oldest: bool = False) -> Iterator[np.ndarray]:
        """Yields 24 kHz audio chunks as frames are generated (streaming Mimi decode): the chunks concatenate to
        what `generate` returns for the same arguments. Each call runs on an engine of its own, stepped in the
        caller's thread between chunks, so streams interleaved in one thread or run from several threads never
        share state."""
        driver = self.driver(self.model.round_slots(1))
        chunks: list[np.ndarray] = []
        driver.submit(Request(text, speaker, list(context or []), seed, temperature, topk, max_audio_ms, drop_oldest),
                      lambda ev: chunks.append(ev.audio) if ev.audio.size else None)
        for _ in driver.steps():
            yield from chunks
            chunks.clear()
