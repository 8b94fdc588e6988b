"""A continuous-batching engine: a fixed number of slots on the device, requests inserted as slots free up.

    engine = Engine(generator, slots=8)
    engine.submit(Request("Hello there.", speaker=0, seed=1))      # -> slot, or None when all are busy
    while engine.busy():
        for slot, event in engine.step().items():                  # K frames for every active slot
            send(event.request, event.audio, event.finished)       # 24 kHz chunk per slot per step

Shape of the loop (JetStream's prefill / insert / generate): a request's prompt is prefilled as one row
and written into its slot's KV cache (in pieces of at most 128 rows, `csm.prefill_pieces`, so compiles
stay few; the slot index is traced, so any slot uses the same compiled function) while the other slots
keep their state; each `step` advances every busy slot by K frames in one device call (only the busy
slots' rows, padded to a power of two, are computed); a batched streaming Mimi decoder turns each slot's
new frames into audio. A slot that finishes (end of speech, frame cap, or `cancel`) is free at once for
the next request. Sampling settings and seeds are per-slot arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax.numpy as jnp
import numpy as np

from csm_jax import csm
from csm_jax.generate import Generator, bucket
from csm_jax.mimi import decode_step, init_decoder_state, reset_state_rows
from csm_jax.text import Segment, build_prompt

FRAME_MS = 80


@dataclass
class Request:
    text: str
    speaker: int = 0
    context: list[Segment] = field(default_factory=list)
    seed: int = 0
    temperature: float = 0.9
    topk: int = 50
    max_audio_ms: int = 10_000


@dataclass
class Event:
    request: Request
    audio: np.ndarray  # new 24 kHz samples (possibly empty)
    codes: np.ndarray  # the new frames' codes (frames, 32)
    finished: bool


class Engine:
    def __init__(self, gen: Generator, slots: int = 4, frames_per_call: int = 4):
        self.gen, self.cfg, self.params = gen, gen.cfg, gen.params
        self.slots, self.K = slots, frames_per_call
        self.state = csm.GenState.create(self.cfg, slots, self.params["c0_head"].dtype)
        self.mimi_state = init_decoder_state(gen.mimi, slots)
        self.requests: dict[int, Request] = {}
        self.ends = np.zeros(slots, np.int64)  # per slot: every position it will write is below this

    def reset(self) -> None:
        """Every slot free with a fresh state (after a failed step left the state half-written)."""
        self.state = csm.GenState.create(self.cfg, self.slots, self.params["c0_head"].dtype)
        self.mimi_state = init_decoder_state(self.gen.mimi, self.slots)
        self.requests.clear()

    def free_slots(self) -> list[int]:
        return [s for s in range(self.slots) if s not in self.requests]

    def busy(self) -> bool:
        return bool(self.requests)

    def submit(self, req: Request) -> int | None:
        """Prefills `req` into a free slot and returns it; None when every slot is busy. Raises ValueError for a
        bad request (empty text, bad speaker, prompt over budget) without touching any slot."""
        free = self.free_slots()
        if not free:
            return None
        if req.max_audio_ms < FRAME_MS:
            raise ValueError(f"max_audio_ms must be at least {FRAME_MS}")
        frames = int(req.max_audio_ms // FRAME_MS)
        tokens, mask, _ = build_prompt(self.gen.tokenizer, self.gen.context_codes(req.context), req.speaker,
                                       req.text, frames, self.cfg.max_seq_len)
        slot = free[0]
        B = self.slots
        rows = jnp.zeros(B, bool).at[slot].set(True)
        self.state = csm.reset_rows(self.state, rows)
        for t, m, length, window in csm.prefill_pieces(self.cfg, tokens[None], mask[None], [len(tokens)]):
            self.state = csm.prefill_slot(self.params, self.cfg, self.state, t, m, length[0], jnp.int32(slot), window)
        one = lambda v, dtype: jnp.full(B, v, dtype)  # noqa: E731  (only the slot's entry is used)
        self.state = csm.set_sampling(self.state, rows, one(req.temperature, jnp.float32), one(req.topk, jnp.int32),
                                      one(req.seed, jnp.int32), one(frames, jnp.int32))
        self.mimi_state = reset_state_rows(self.mimi_state, rows)
        self.requests[slot] = req
        self.ends[slot] = len(tokens)
        return slot

    def cancel(self, slot: int) -> None:
        """Stops a slot's request (e.g. its client went away); the slot is free at once."""
        if slot in self.requests:
            rows = jnp.zeros(self.slots, bool).at[slot].set(True)
            self.state = csm.reset_rows(self.state, rows)
            del self.requests[slot]

    def step(self) -> dict[int, Event]:
        """K frames for every active slot (one device call), decoded to audio. Finished slots are freed."""
        if not self.requests:
            return {}
        active = sorted(self.requests)
        self.ends[active] += self.K
        window = csm.attention_window(self.cfg, int(self.ends[active].max()))
        R = bucket(len(active), 1)  # run only the busy slots, padded with idle ones to a power of two
        if R >= self.slots:
            self.state, frames, valid = csm.generate_frames(self.params, self.cfg, self.state, self.K, window)
            frames, valid = np.asarray(frames), np.asarray(valid)
        else:
            rows = active + [s for s in range(self.slots) if s not in self.requests][:R - len(active)]
            self.state, sub_frames, sub_valid = csm.generate_frames_rows(
                self.params, self.cfg, self.state, jnp.asarray(rows, jnp.int32), self.K, window)
            frames = np.zeros((self.slots, self.K, self.cfg.num_codebooks), np.int32)
            valid = np.zeros((self.slots, self.K), bool)
            frames[rows], valid[rows] = np.asarray(sub_frames), np.asarray(sub_valid)
        done = np.asarray(self.state.done)
        pcm = {s: [] for s in active}
        for k in range(self.K):
            if not valid[:, k].any():
                continue
            self.mimi_state, audio = decode_step(self.gen.mimi, self.mimi_state, jnp.asarray(frames[:, k]),
                                                 active=jnp.asarray(valid[:, k]))
            audio = np.asarray(audio)
            for s in active:
                if valid[s, k]:
                    pcm[s].append(audio[s])
        events = {}
        for s in active:
            finished = bool(done[s])
            events[s] = Event(self.requests[s], np.concatenate(pcm[s]) if pcm[s] else np.zeros(0, np.float32),
                              frames[s][valid[s]], finished)
            if finished:
                del self.requests[s]
        return events
