"""The driver (csm_jax.driver): the one loop that steps an engine. Run in the caller's thread or in its own,
every request gets the codes it gets alone; capacity, cancel, shutdown, failure and warm-up as documented."""

import ast
import time
from pathlib import Path

import numpy as np
import pytest

from csm_jax import programs
from csm_jax.dialogue import Dialogue
from csm_jax.driver import EngineFailed, Full, ShuttingDown
from csm_jax.generate import Generator
from csm_jax.request import Request

from event_sink import Collect

REQUESTS = [Request("The first one, a little longer than the rest.", seed=1, max_audio_ms=800),
            Request("Second.", speaker=1, seed=2, max_audio_ms=480),
            Request("Third, greedy.", seed=3, temperature=0.0, max_audio_ms=640)]


@pytest.fixture(scope="module")
def gen(csm_dir):
    return Generator(str(csm_dir), frames_per_call=4)


@pytest.fixture(scope="module")
def solo(gen):
    """Each request's codes generated alone (a batch of one)."""
    return [gen.generate_codes([r.text], speakers=r.speaker, seeds=r.seed, temperature=r.temperature,
                               max_audio_ms=r.max_audio_ms)[0] for r in REQUESTS]


@pytest.mark.slow
def test_run_in_the_callers_thread_equals_alone(gen, solo):
    """Three requests on three slots, stepped in the caller's thread until done; a fourth, submitted between
    two steps of `steps()`, waits in the queue for a free slot."""
    driver = gen.driver(3, max_queue=1)
    sinks = [Collect() for _ in REQUESTS]
    for r, sink in zip(REQUESTS, sinks):
        driver.submit(r, sink)
    late, late_sink, steps = Request("Late.", seed=4, max_audio_ms=320), Collect(), 0
    for _ in driver.steps():
        steps += 1
        if steps == 2:
            driver.submit(late, late_sink)  # waits in the queue until a slot is free
    for sink, want in zip(sinks, solo):
        np.testing.assert_array_equal(sink.codes(), want)
    np.testing.assert_array_equal(late_sink.codes(),
                                  gen.generate_codes([late.text], seeds=4, max_audio_ms=320)[0])
    assert driver.admitted == 0 and not driver.engine.busy()


@pytest.mark.slow
def test_run_in_a_thread_equals_alone(gen, solo):
    """The same requests submitted one by one to a driver whose thread steps the engine."""
    sinks = [Collect() for _ in REQUESTS]
    with gen.driver(2, max_queue=1) as driver:
        for r, sink in zip(REQUESTS, sinks):
            driver.submit(r, sink)
            time.sleep(0.05)
        got = [sink.codes() for sink in sinks]
    for codes, want in zip(got, solo):
        np.testing.assert_array_equal(codes, want)
    assert not driver.thread.is_alive()


@pytest.mark.slow
def test_capacity_cancel_and_bad_requests(gen):
    """slots + max_queue requests are admitted, one more is refused with Full; a cancelled waiting request
    frees its place at once and hears nothing; a bad request raises at submit and takes no place."""
    driver = gen.driver(1, max_queue=1)
    first, waiting = Collect(), Collect()
    a = driver.submit(Request("In the slot.", seed=1, max_audio_ms=2000), first)
    b = driver.submit(Request("Waiting.", seed=2), waiting)
    with pytest.raises(Full, match="all 2 places .1 slots and 1 queued. are taken"):
        driver.submit(Request("One too many."), Collect())
    driver.cancel(b)
    assert driver.admitted == 1 and waiting.events == []
    with pytest.raises(ValueError, match="text is empty"):
        driver.submit(Request("   "), Collect())
    assert driver.admitted == 1
    # In a slot: cancelled at the next turn; its slot is free, no further event, no finished one.
    steps = driver.steps()
    next(steps)  # admitted and prefilled
    assert a.slot == 0 and driver.engine.free_slots() == []
    heard = len(first.events)
    driver.cancel(a)
    for _ in steps:  # the cancel runs at the next turn; the step then in flight is drained, its frames dropped
        pass
    assert driver.engine.free_slots() == [0] and driver.admitted == 0 and not driver.engine.busy()
    assert len(first.events) == heard and not first.finished.is_set()


def test_shutdown_ends_waiting_at_once_and_the_slot_after_the_grace(gen):
    driver = gen.driver(1, max_queue=1).start_thread()
    running, waiting = Collect(), Collect()
    driver.submit(Request("A long answer that will not finish.", seed=1, max_audio_ms=60_000), running)
    driver.submit(Request("Never started.", seed=2), waiting)
    while not running.events:
        time.sleep(0.01)
    t0 = time.monotonic()
    driver.shutdown(grace=0.5)
    assert waiting.finished.is_set() and waiting.events[-1].shutdown and "not started" in waiting.events[-1].error
    with pytest.raises(ShuttingDown):
        driver.submit(Request("After the shutdown."), Collect())
    assert running.finished.wait(60)
    assert time.monotonic() - t0 >= 0.5  # the slot had its grace
    last = running.events[-1]
    assert last.shutdown and "not finished in time" in last.error and last.audio.size == 0
    driver.thread.join(60)
    assert not driver.thread.is_alive() and driver.engine.free_slots() == [0]


def test_failed_step_in_the_callers_thread_tells_everyone_and_raises(gen, solo, monkeypatch):
    driver = gen.driver(2)
    sinks = [Collect(), Collect()]
    for r, sink in zip(REQUESTS[:2], sinks):
        driver.submit(r, sink)

    def broken(*args):
        raise RuntimeError("injected device failure")

    real = programs.generate_audio
    monkeypatch.setattr(programs, "generate_audio", broken)
    with pytest.raises(RuntimeError, match="injected"):
        driver.run()
    for sink in sinks:
        assert sink.finished.is_set() and "injected" in sink.events[-1].error and not sink.events[-1].shutdown
    assert driver.admitted == 0 and driver.engine.free_slots() == [0, 1] and not driver.engine.busy()
    monkeypatch.setattr(programs, "generate_audio", real)
    again = Collect()
    driver.submit(REQUESTS[0], again)
    driver.run()
    np.testing.assert_array_equal(again.codes(), solo[0])


def test_warmup_failure_is_fatal_and_told(gen, monkeypatch):
    """A warm-up that fails in the driver's thread: `on_fatal` hears the cause, a request waiting for the
    warm-up ends with it, new ones are refused, and a dialogue's wait raises instead of waiting forever."""
    class Broken:  # the warm-up's first program: it fails to compile (and would fail to run)
        def __call__(self, *args):
            raise RuntimeError("injected warm-up failure")

        lower = __call__

    monkeypatch.setattr(programs, "generate_audio", Broken())
    driver = gen.driver(1)
    fatal, waiting = [], Collect()
    driver.on_fatal = fatal.append
    driver.submit(REQUESTS[1], waiting)
    driver.start_thread(warmup=True)
    driver.thread.join(120)
    assert [str(e) for e in fatal] == ["injected warm-up failure"] and driver.fatal is fatal[0]
    compiled, total = driver.warmup_progress  # (programs compile several at once: others may have finished)
    assert not driver.warming and compiled < total
    assert waiting.finished.is_set() and "injected warm-up failure" in waiting.events[-1].error
    with pytest.raises(EngineFailed, match="its warm-up failed .RuntimeError: injected warm-up failure."):
        driver.submit(REQUESTS[0], Collect())
    d = Dialogue(driver)
    with pytest.raises(RuntimeError, match="warm-up failed"):
        list(d.speak("Hello."))


def test_dialogue_without_a_running_driver_raises(gen):
    """A dialogue waits only for a driver whose thread steps the engine; otherwise its first wait raises."""
    from csm_jax.text import Segment

    d = Dialogue(gen.driver(1))
    with pytest.raises(RuntimeError, match="no thread runs the driver"):
        d.add(Segment(0, "Nobody prefills this."))
    with pytest.raises(RuntimeError, match="no thread runs the driver"):
        list(d.speak("Nobody steps this."))


def test_one_place_steps_an_engine():
    """In the library, `.step()` is called in one place: the driver's `_step` (read from the source)."""
    package = Path(__file__).resolve().parents[1] / "csm_jax"
    calls = []
    for path in package.rglob("*.py"):
        for fn in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                calls += [(str(path.relative_to(package)), fn.name) for node in ast.walk(fn)
                          if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                          and node.func.attr == "step"]
    assert calls == [("driver.py", "_step")], calls
