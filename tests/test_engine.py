"""The continuous-batching engine: requests inserted into a busy batch, slots reused, per-request results
equal to generating each request alone."""

import numpy as np
import pytest

from csm_jax.engine import Engine, Request
from csm_jax.generate import Generator


@pytest.fixture(scope="module")
def gen(csm_dir):
    return Generator(str(csm_dir), frames_per_call=4)


def _alone(gen, r):
    audio, codes = gen.generate(r.text, speakers=r.speaker, seeds=r.seed, temperature=r.temperature, topk=r.topk,
                                max_audio_ms=r.max_audio_ms, return_codes=True)
    return audio, codes


def _drain(engine, results):
    while engine.busy():
        for slot, ev in engine.step().items():
            key = id(ev.request)
            audio, codes = results.setdefault(key, ([], []))
            audio.append(ev.audio)
            codes.append(ev.codes)


def test_insert_into_busy_batch_and_equal_alone(gen):
    engine = Engine(gen, slots=2, frames_per_call=4)
    a = Request("The first request, already running.", speaker=0, seed=1, max_audio_ms=1280)
    b = Request("A second one arrives later.", speaker=1, seed=2, max_audio_ms=960)
    results = {}
    assert engine.submit(a) == 0
    for _ in range(2):  # a runs alone for 8 frames
        for slot, ev in engine.step().items():
            results.setdefault(id(ev.request), ([], []))[0].append(ev.audio)
            results[id(ev.request)][1].append(ev.codes)
    assert engine.submit(b) == 1
    _drain(engine, results)
    for r in (a, b):
        audio_alone, codes_alone = _alone(gen, r)
        audio, codes = results[id(r)]
        np.testing.assert_array_equal(np.concatenate(codes).T, codes_alone)
        audio = np.concatenate(audio)
        assert audio.shape == audio_alone.shape
        assert np.abs(audio - audio_alone).max() <= 1e-5 * np.abs(audio_alone).max()


def test_full_slots_reuse_and_cancel(gen):
    engine = Engine(gen, slots=1, frames_per_call=4)
    first = Request("Short.", seed=3, max_audio_ms=160)  # two frames
    assert engine.submit(first) == 0
    assert engine.submit(Request("No room.")) is None
    events = engine.step()
    assert events[0].finished and len(events[0].codes) <= 2 and not engine.busy()
    second = Request("The slot is reused.", seed=4, max_audio_ms=640)
    assert engine.submit(second) == 0
    results = {}
    _drain(engine, results)
    np.testing.assert_array_equal(np.concatenate(results[id(second)][1]).T, _alone(gen, second)[1])
    third = Request("Cancelled midway.", seed=5, max_audio_ms=2000)
    assert engine.submit(third) == 0
    engine.step()
    engine.cancel(0)
    assert not engine.busy() and engine.free_slots() == [0]
    with pytest.raises(ValueError, match="text is empty"):
        engine.submit(Request("  "))
    assert engine.free_slots() == [0]
