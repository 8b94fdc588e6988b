"""A device stand-in: the engine's programs run on the host and cost seconds of a clock, so the real engine,
driver, schedule and server run without an accelerator (benchmarks/simulate_serving.py drives them so, and
benchmarks/bench_host.py measures the host's own work per step so).

    clock = FakeClock()                                      # or WallClock(): programs that take real seconds
    device = StubDevice(slots, frames_per_call, clock, generate_s=lambda rows: 0.1, prefill_s=lambda rows: 0.0)
    engine = Engine(StubModel(prompt_rows=17), slots, frames_per_call, clock=clock, programs=device)

Time: the device runs the programs it is given one after another, as a GPU's stream does: each starts when the
one before it ended (or when it is dispatched, if the device was idle) and takes its cost in seconds; reading a
result on the host (np.asarray, as the engine does) waits on the clock until its program ended. On a
FakeClock, dispatching and the host's own work take no time; on the WallClock the host works while the
"device" runs, as it would beside a real one.

What the programs do, as far as the engine's results depend on it: generation makes frames for each generating
slot until its frame cap, as csm.run_frames does (a slot is done in the results of the frame that reaches its
cap; codes 1, never an end of speech) and costs `generate_s(rows)`, with the rows the real programs compute
(csm_jax.programs.bucket_rows). Each slot's PCM is its own row of `pcm` at every step (default: uniform in
[-1.2, 1.2], partly out of range, as a decoder's output can be), with its 16-bit PCM as the real program makes
it (audio.pcm16). Prefill splits the requests into the real groups (`split_counts`) and pieces
(csm.prefill_pieces), each call costing `prefill_s(requests x piece rows)`. Slot updates (reset, start, stop,
rewind) cost nothing.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from csm_jax import csm
from csm_jax.audio import FRAME_SAMPLES, pcm16
from csm_jax.programs import bucket_rows, group_counts, split_counts


class FakeClock:
    """Seconds that pass only when something waits (`wait_until`)."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def wait_until(self, t: float) -> None:
        self.now = max(self.now, t)


class WallClock:
    """time.perf_counter, waited on by sleeping (the host's other threads run meanwhile)."""

    def __call__(self) -> float:
        return time.perf_counter()

    def wait_until(self, t: float) -> None:
        delay = t - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


class StubState:
    """What the stand-in programs keep per slot: finished or not, and the frames it may still make."""

    def __init__(self, slots: int):
        self.done = np.ones(slots, bool)
        self.left = np.zeros(slots, np.int64)


class StubModel:
    """The loaded model as far as the engine uses it (csm_jax.bundle.ModelBundle): every prompt has
    `prompt_rows` rows, the state is a StubState, one device; csm-1b's config (the server reads its limits)."""

    mesh = None

    def __init__(self, prompt_rows: int = 17):
        if prompt_rows < 1:
            raise ValueError(f"a prompt has at least one row, got prompt_rows={prompt_rows}")
        self.prompt_rows, self.cfg = prompt_rows, csm.CsmConfig.csm_1b()

    def check_slots(self, slots: int) -> None:
        pass

    def new_state(self, slots: int) -> StubState:
        return StubState(slots)

    def new_mimi_state(self, slots: int) -> None:
        return None

    def prompt(self, context, speaker, text, max_frames, drop_oldest=False) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros((self.prompt_rows, 33), np.int32), np.ones((self.prompt_rows, 33), bool)


class Result:
    """A program's output as the engine reads it: np.asarray waits on the clock until the program ended."""

    def __init__(self, value: np.ndarray, ready: float, clock: FakeClock | WallClock):
        self.value, self.ready, self.clock = value, ready, clock

    def copy_to_host_async(self) -> None:
        pass

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        self.clock.wait_until(self.ready)
        return self.value if dtype is None else self.value.astype(dtype)


class StubDevice:
    """The engine's programs (csm_jax.programs.Programs' methods) on the host, on `clock`. `calls` and `busy_s`
    count the programs run and the device seconds they took, by kind ("generate", "prefill"). `pcm`: each
    slot's PCM of a step, (slots, frames_per_call * FRAME_SAMPLES) float32."""

    def __init__(self, slots: int, frames_per_call: int, clock: FakeClock | WallClock,
                 generate_s: Callable[[int], float] = lambda rows: 0.0,
                 prefill_s: Callable[[int], float] = lambda rows: 0.0, pcm: np.ndarray | None = None):
        self.slots, self.frames_per_call, self.clock = slots, frames_per_call, clock
        self.generate_s, self.prefill_s = generate_s, prefill_s
        self.counts = group_counts(slots)
        self.free_at = 0.0  # when the device ends the last program it was given
        self.calls = {"generate": 0, "prefill": 0}
        self.busy_s = {"generate": 0.0, "prefill": 0.0}
        shape = (slots, frames_per_call * FRAME_SAMPLES)
        self.pcm = np.random.default_rng(0).uniform(-1.2, 1.2, shape).astype(np.float32) if pcm is None else pcm
        if self.pcm.shape != shape or self.pcm.dtype != np.float32:
            raise ValueError(f"pcm must be float32 {shape} (slots, frames_per_call * {FRAME_SAMPLES}), got "
                             f"{self.pcm.dtype} {self.pcm.shape}")
        self.pcm16 = pcm16(self.pcm)
        self.codes = np.ones((slots, frames_per_call, 32), np.int32)

    def _run(self, kind: str, seconds: float) -> float:
        """Queues `seconds` of device work; -> when it ends."""
        self.calls[kind] += 1
        self.busy_s[kind] += seconds
        self.free_at = max(self.free_at, self.clock()) + seconds
        return self.free_at

    def table(self, state, mimi_state) -> list:
        return []  # nothing to compile

    def compile(self, state, mimi_state, progress=None, workers=None) -> list:
        return []

    def generate(self, state: StubState, mimi_state, active: list[int]):
        rows, F = np.asarray(active, np.int64), self.frames_per_call
        made = np.where(state.done[rows], 0, np.minimum(state.left[rows], F))
        state.left[rows] -= made
        state.done[rows] |= state.left[rows] == 0
        ready = self._run("generate", self.generate_s(bucket_rows(len(active), self.slots)))
        # The padding rows a real program computes are never read: they are not returned. Every slot at once
        # (a full engine, in order) takes the PCM as it is, as a device's results come, without a copy.
        whole = len(active) == self.slots
        pcm, ints = (self.pcm, self.pcm16) if whole else (self.pcm[rows], self.pcm16[rows])
        out = (pcm, ints, self.codes[:len(active)], np.arange(F)[None, :] < made[:, None], state.done[rows])
        return state, mimi_state, list(active), tuple(Result(a, ready, self.clock) for a in out)

    def prefill(self, state: StubState, slot_ids: list[int], tokens: np.ndarray, mask: np.ndarray,
                lengths: np.ndarray) -> StubState:
        start = 0
        for C in split_counts(len(slot_ids), self.counts):
            group = slice(start, start + C)
            for t, _, _ in csm.prefill_pieces(tokens[group], mask[group], lengths[group], put=np.asarray):
                self._run("prefill", self.prefill_s(C * t.shape[1]))
            start += C
        return state

    def reset(self, state: StubState, slot_ids: list[int]) -> StubState:
        state.done[slot_ids], state.left[slot_ids] = True, 0
        return state

    def start(self, state: StubState, mimi_state, slot_ids: list[int], sampling: list[tuple]):
        caps = np.array([s[3] for s in sampling], np.int64)  # (temperature, topk, seed, max_frames)
        state.left[slot_ids], state.done[slot_ids] = caps, caps <= 0
        return state, mimi_state

    def stop(self, state: StubState, slot_ids: list[int]) -> StubState:
        state.done[slot_ids] = True
        return state

    def rewind(self, state: StubState, slot_ids: list[int], rows: list[int]) -> StubState:
        return state
