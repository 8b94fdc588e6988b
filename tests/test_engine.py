"""The engine: requests inserted into a busy batch and admitted together, slots reused, conversations held
in slots beside them; every request's results equal generating it alone; nothing compiles after warm-up; a
failed step is told to everyone and the engine starts afresh."""

import threading
import time

import jax
import numpy as np
import pytest

from csm_jax import programs
from csm_jax.dialogue import Dialogue
from csm_jax.driver import Driver
from csm_jax.engine import Engine
from csm_jax.generate import Generator
from csm_jax.request import Request
from csm_jax.schedule import Scheduler
from csm_jax.text import Segment

from event_sink import Collect


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
            key = id(ev.owner)
            audio, codes = results.setdefault(key, ([], []))
            audio.append(ev.audio)
            codes.append(ev.codes)


@pytest.mark.slow
def test_insert_into_busy_batch_and_equal_alone(gen):
    engine = Engine(gen.model, slots=2, frames_per_call=4)
    a = Request("The first request, already running.", speaker=0, seed=1, max_audio_ms=1280)
    b = Request("A second one arrives later.", speaker=1, seed=2, max_audio_ms=960)
    results = {}
    assert engine.submit(a) == 0
    for _ in range(2):  # a runs alone for 8 frames
        for slot, ev in engine.step().items():
            results.setdefault(id(ev.owner), ([], []))[0].append(ev.audio)
            results[id(ev.owner)][1].append(ev.codes)
    assert engine.submit(b) == 1
    _drain(engine, results)
    for r in (a, b):
        audio_alone, codes_alone = _alone(gen, r)
        audio, codes = results[id(r)]
        np.testing.assert_array_equal(np.concatenate(codes).T, codes_alone)
        audio = np.concatenate(audio)
        assert audio.shape == audio_alone.shape
        assert np.abs(audio - audio_alone).max() <= 1e-5 * np.abs(audio_alone).max()


def test_each_event_has_its_frames_pcm_and_its_16_bit_pcm(gen):
    """Each event's audio is its new frames' PCM (1,920 samples a frame; a step cut short at a frame cap gives
    fewer), the same as alone, and its pcm16 is those samples by the server's 16-bit formula written out here
    (clipped to [-1, 1], times 32767, truncated), converted by the generation program: with every slot in the
    program and with one row gathered once the other request has finished."""
    engine = Engine(gen.model, slots=2, frames_per_call=4)
    reqs = [Request("Five frames at most.", seed=1, max_audio_ms=400),
            Request("Eleven frames at most, here.", speaker=1, seed=2, max_audio_ms=880)]
    assert [engine.submit(r) for r in reqs] == [0, 1]
    events = []
    while engine.busy():
        events += engine.step().values()
    for r in reqs:
        mine = [ev for ev in events if ev.owner is r]
        for ev in mine:
            assert ev.audio.dtype == np.float32 and ev.pcm16.dtype == np.int16
            assert len(ev.audio) == len(ev.pcm16) == 1920 * len(ev.codes)
            assert ev.pcm16.tobytes() == (np.clip(ev.audio, -1, 1) * 32767).astype("<i2").tobytes()
        audio_alone, codes_alone = _alone(gen, r)
        np.testing.assert_array_equal(np.concatenate([ev.codes for ev in mine]).T, codes_alone)
        audio = np.concatenate([ev.audio for ev in mine])
        assert audio.shape == audio_alone.shape and audio.size > 0
        assert np.abs(audio - audio_alone).max() <= 1e-5 * np.abs(audio_alone).max()
    assert sum(len(ev.codes) for ev in events if ev.owner is reqs[0]) <= 5


def test_full_slots_reuse_and_cancel(gen):
    engine = Engine(gen.model, slots=1, frames_per_call=4)
    first = Request("Short.", seed=3, max_audio_ms=160)  # two frames
    assert engine.submit(first) == 0
    assert engine.submit(Request("No room.")) is None
    events = {}
    while not events:  # the first step only dispatches; its results come with the next
        events = engine.step()
    assert events[0].finished and len(events[0].codes) <= 2
    assert engine.free_slots() == [0]  # free at once, though a masked step is still in flight
    engine.step()
    assert not engine.busy()
    second = Request("The slot is reused.", seed=4, max_audio_ms=640)
    assert engine.submit(second) == 0
    results = {}
    _drain(engine, results)
    np.testing.assert_array_equal(np.concatenate(results[id(second)][1]).T, _alone(gen, second)[1])
    third = Request("Cancelled midway.", seed=5, max_audio_ms=2000)
    assert engine.submit(third) == 0
    engine.step()
    engine.cancel(0)
    assert engine.free_slots() == [0]
    assert engine.step() == {}  # the cancelled request's in-flight step is dropped
    assert not engine.busy()
    with pytest.raises(ValueError, match="text is empty"):
        engine.submit(Request("  "))
    assert engine.free_slots() == [0]


@pytest.mark.slow
def test_requests_admitted_together_equal_alone(gen):
    """Three requests submitted at once are prefilled in one batch (padded to four, the fourth slot busy
    generating) and each gets the codes it gets alone."""
    engine = Engine(gen.model, slots=4, frames_per_call=4)
    running = Request("Already speaking here.", seed=9, max_audio_ms=1600)
    engine.submit(running)
    results = {}
    for _ in range(2):
        for ev in engine.step().values():
            results.setdefault(id(ev.owner), []).append(ev.codes)
    batch = [Request("One.", seed=1, max_audio_ms=480),
             Request("A second, longer prompt than the first one.", speaker=1, seed=2, max_audio_ms=640),
             Request("Third.", seed=3, temperature=0.0, max_audio_ms=400)]
    assert [engine.submit(r) for r in batch] == [1, 2, 3]
    while engine.busy():
        for ev in engine.step().values():
            results.setdefault(id(ev.owner), []).append(ev.codes)
    for r in [running, *batch]:
        np.testing.assert_array_equal(np.concatenate(results[id(r)]).T, _alone(gen, r)[1])


@pytest.mark.slow
def test_many_requests_admitted_within_the_row_budget_equal_alone(gen):
    """64 requests submitted together on a 64-slot engine with a budget of 512 prompt rows a step: their prompts
    (different texts, every one within 32 rows: 64 x 32 = 2,048 padded rows) are all prefilled after
    ceil(2,048 / 512) = 4 steps (16 a step, as groups of 8), not 8 a step as before, and each gets the codes
    it gets alone."""
    engine = Engine(gen.model, slots=64, frames_per_call=4, prefill_rows=512, clock=lambda: 0.0)
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight"]
    reqs = [Request(f"Request {' '.join(words[:1 + k % 8])} at {k}.", speaker=k % 2, seed=k,
                    temperature=0.0 if k % 5 == 0 else 0.9, max_audio_ms=240) for k in range(64)]
    rows = [len(gen.model.prompt([], r.speaker, r.text, 3, False)[0]) for r in reqs]
    assert max(rows) <= 32 and len(set(rows)) > 4
    assert [engine.submit(r) for r in reqs] == list(range(64))
    started, real_start = [], engine._start_slots
    engine._start_slots = lambda slot_ids, sampling: (started.append(len(slot_ids)), real_start(slot_ids, sampling))
    results, steps = {}, 0
    while engine.busy():
        _codes_by_owner(engine, results)
        steps += 1
        if steps <= 4:
            assert len(started) == steps, started  # every step started some
    assert started == [16, 16, 16, 16]
    for r in reqs:
        np.testing.assert_array_equal(np.concatenate(results[id(r)]).T, _alone(gen, r)[1])


@pytest.mark.slow
def test_conversation_slot_beside_requests_equals_the_whole_history(gen):
    """A dialogue holding a slot of a busy engine replies with the codes Sesame's way (the whole history as one
    prompt, alone) gives, and requests running beside it get their solo codes."""
    engine = Engine(gen.model, slots=3, frames_per_call=4)
    rng = np.random.default_rng(4)
    with Driver(engine) as driver:  # its thread steps the engine while the dialogue waits for its events
        d = Dialogue(driver, [Segment(1, "My voice.", codes=rng.integers(0, 2048, (32, 12)))])
        other = Request("Meanwhile, a plain request.", seed=5, max_audio_ms=1200)
        results = Collect()
        driver.submit(other, results)
        d.add(Segment(0, "Hello there.", codes=rng.integers(0, 2048, (32, 9))))
        history = list(d.segments)
        chunks = list(d.speak("Hi, nice to hear you.", seed=6, max_audio_ms=640))
        other_codes = results.codes()
        ref = gen.generate_codes(["Hi, nice to hear you."], speakers=1, contexts=[history], seeds=6,
                                 max_audio_ms=640)
        np.testing.assert_array_equal(d.segments[-1].codes, ref[0])
        assert sum(c.size for c in chunks) == 1920 * ref[0].shape[1]
        np.testing.assert_array_equal(other_codes, _alone(gen, other)[1])
        d.close()
        assert engine.free_slots() == [0, 1, 2]


@pytest.mark.slow
def test_nothing_compiles_after_warmup(gen):
    """Warm-up compiles every program; a mixed load afterwards (requests of different lengths admitted one
    and several at a time, a cancel, a conversation appending, speaking and being stopped) compiles none."""
    compiles = []
    counting = [False]

    def listener(event, duration, **kw):
        if counting[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    engine = Engine(gen.model, slots=4, frames_per_call=4, max_prefill=4)
    messages = []
    assert engine.warmup(lambda *progress: messages.append(progress)) == len(messages) > 0
    # The same load with prompts prefilled across steps (64 rows a step): an engine of the same shapes, so the
    # first one's warm-up compiled its programs (its own warm-up runs before counting anyway).
    chunked = Engine(gen.model, slots=4, frames_per_call=4, max_prefill=4, prefill_rows=64)
    chunked.warmup()
    counting[0] = True
    try:
        _mixed_load(engine)
        _mixed_load(chunked)
    finally:
        counting[0] = False
    assert compiles == []


def _mixed_load(engine):
    rng = np.random.default_rng(0)
    with Driver(engine) as driver:
        d = Dialogue(driver, [Segment(1, "Voice.", codes=rng.integers(0, 2048, (32, 150)))])
        d.add(Segment(0, "A user turn.", codes=rng.integers(0, 2048, (32, 40))))
        done = [Collect(), Collect()]
        driver.submit(Request("One request alone.", seed=1, max_audio_ms=800), done[0])
        while not done[0].events:
            time.sleep(0.01)
        driver.submit(Request("Two at once.", seed=2, max_audio_ms=400), done[1])
        voice = [Segment(1, "A long voice prompt.", codes=rng.integers(0, 2048, (32, 200)))]
        doomed = driver.submit(Request("The second is cancelled.", context=voice, seed=3, max_audio_ms=2000),
                               Collect())
        while doomed.slot is None:  # cancelled once it has a slot: the engine's cancel runs
            time.sleep(0.01)
        driver.cancel(doomed)
        cancel = threading.Event()
        for _ in d.speak("A reply, cut short.", seed=4, max_audio_ms=2000, cancel=cancel):
            cancel.set()
        for c in done:
            c.codes()
        d.close()


def test_failed_step_tells_everyone_and_the_engine_recovers(gen, monkeypatch):
    """A failed step (the driver's thread steps the engine): every owner is told, the engine starts afresh, is
    checked and serves again."""
    engine = Engine(gen.model, slots=2, frames_per_call=4)
    resets = []  # what each reset returned, and the engine just after it
    real_reset = engine.reset

    def reset():
        owners = real_reset()
        resets.append((owners, engine.free_slots(), engine.busy()))
        return owners

    engine.reset = reset
    real = programs.generate_audio

    def broken(*args):
        raise RuntimeError("injected device failure")

    monkeypatch.setattr(programs, "generate_audio", broken)
    with Driver(engine) as driver:
        d = Dialogue(driver)
        told = Collect()
        req = Request("Lost to the failure.", seed=1, max_audio_ms=800)
        driver.submit(req, told)
        assert told.finished.wait(300)
        owners, free, busy = resets[0]
        assert {id(t.owner) for t in owners} == {id(req), id(d)}
        told = told.events
        assert told and told[-1].finished and "injected" in told[-1].error
        assert free == [0, 1] and not busy
        monkeypatch.setattr(programs, "generate_audio", real)
        deadline = time.time() + 300
        while driver.failure is not None:  # the probe passes once the program works again
            assert time.time() < deadline
            time.sleep(0.05)
        # Fresh state: a new request gets its solo codes; the dialogue holds a new slot and speaks again.
        again = Request("Served after recovery.", seed=2, max_audio_ms=480)
        codes = Collect()
        driver.submit(again, codes)
        np.testing.assert_array_equal(codes.codes(), _alone(gen, again)[1])
        assert np.concatenate(list(d.speak("Still here.", seed=3, max_audio_ms=240))).size > 0


def _codes_by_owner(engine, results):
    events = engine.step()
    for ev in events.values():
        results.setdefault(id(ev.owner), []).append(ev.codes)


@pytest.mark.slow
def test_length_classes_prefilled_as_groups_and_codes_equal_alone(gen):
    """Prompts of different length classes submitted together are prefilled at one step, one group per class
    (a later short one with the earlier short one, the long one apart), start together, and every request
    still gets its solo codes."""
    engine = Engine(gen.model, slots=4, frames_per_call=4)
    rng = np.random.default_rng(7)
    voice = [Segment(1, "A voice prompt with audio.", codes=rng.integers(0, 2048, (32, 80)))]
    short1 = Request("Short one.", seed=1, max_audio_ms=480)
    long_ = Request("The long one, after its voice prompt.", speaker=1, context=voice, seed=2, max_audio_ms=480)
    short2 = Request("Short two.", seed=3, max_audio_ms=480)
    rows = {id(r): len(gen.model.prompt(r.context, r.speaker, r.text, 6, False)[0]) for r in (short1, long_, short2)}
    assert rows[id(short1)] <= 32 and rows[id(short2)] <= 32 and rows[id(long_)] > 64  # different classes
    slots = [engine.submit(r) for r in (short1, long_, short2)]
    admitted, groups = [], []
    real_start, real_prefill = engine._start_slots, engine.programs.prefill

    def spy_start(start_slots, sampling):
        admitted.append(sorted(start_slots))
        real_start(start_slots, sampling)

    def spy_prefill(state, slot_ids, tokens, mask, lengths):
        groups.append((list(slot_ids), tokens.shape[1]))
        return real_prefill(state, slot_ids, tokens, mask, lengths)

    engine._start_slots, engine.programs.prefill = spy_start, spy_prefill
    results = {}
    while engine.busy():
        _codes_by_owner(engine, results)
    assert admitted == [sorted(slots)]
    padded = -(-rows[id(long_)] // 32) * 32
    assert groups == [([slots[0], slots[2]], 32), ([slots[1]], padded)]
    for r in (short1, long_, short2):
        np.testing.assert_array_equal(np.concatenate(results[id(r)]).T,
                                      gen.generate_codes([r.text], speakers=r.speaker, contexts=[r.context],
                                                         seeds=r.seed, max_audio_ms=r.max_audio_ms)[0])


@pytest.mark.slow
def test_stream_near_its_playback_defers_admission_boundedly(gen):
    """On a fake clock where a step takes 0.3 s (its four frames are 0.32 s of audio) and a prefilled row was
    measured at 10 ms, the running stream's slack (0.04 s, growing 0.02 s a step) is below a step plus the new
    request's prefill: the request waits, is admitted after max_defer = 3 steps passed it over, and both
    get their solo codes."""
    t = [0.0]
    engine = Engine(gen.model, slots=4, frames_per_call=4, clock=lambda: t[0],
                    schedule=Scheduler(max_count=4, max_rows=1024, max_defer=3, step_audio_s=0.32))
    running = Request("Running for a while now.", seed=4, max_audio_ms=4000)
    waiting = Request("Waits its turn.", seed=5, max_audio_ms=480)
    engine.submit(running)
    results = {}
    for _ in range(3):  # running's first audio at the second step
        t[0] += 0.3
        _codes_by_owner(engine, results)
    assert engine.schedule.step_s == pytest.approx(0.3)
    engine.schedule.row_s = 0.01
    assert engine.schedule.slack(t[0] + 0.3) == pytest.approx(0.04)
    engine.submit(waiting)
    first_step = None
    for k in range(8):
        t[0] += 0.3
        _codes_by_owner(engine, results)
        if first_step is None and id(waiting) in results:
            first_step = k
    # Passed over at three steps, prefilled at the fourth (k = 3), its first audio a step later (pipelining).
    assert first_step == 4
    while engine.busy():
        t[0] += 0.3
        _codes_by_owner(engine, results)
    for r in (running, waiting):
        np.testing.assert_array_equal(np.concatenate(results[id(r)]).T, _alone(gen, r)[1])


@pytest.mark.slow
def test_long_prompt_prefilled_across_steps_beside_a_running_stream(gen):
    """With 64 prompt rows a step, a request whose prompt (a voice prompt) is several pieces long, submitted
    while another stream generates, is prefilled over several steps and starts only when its last rows are in;
    the running stream gets its four frames at every one of those steps, and both get their solo codes (alone,
    the prompt is prefilled in one go). A frozen clock keeps the schedule's row budget at prefill_rows."""
    engine = Engine(gen.model, slots=2, frames_per_call=4, prefill_rows=64, clock=lambda: 0.0)
    rng = np.random.default_rng(11)
    voice = [Segment(1, "A voice prompt of many frames.", codes=rng.integers(0, 2048, (32, 200)))]
    running = Request("Running all along.", seed=4, max_audio_ms=4000)
    long_ = Request("Spoken after a long prompt.", speaker=1, context=voice, seed=5, max_audio_ms=480)
    results = {}
    engine.submit(running)
    for _ in range(2):
        _codes_by_owner(engine, results)
    slot = engine.submit(long_)
    left = [engine.waiting_rows(slot)]
    assert left[0] > 3 * 64
    while engine.waiting_rows(slot):
        assert slot not in engine.generating
        heard = len(results[id(running)])
        _codes_by_owner(engine, results)
        left.append(engine.waiting_rows(slot))
        assert len(results[id(running)]) == heard + 1 and len(results[id(running)][-1]) == 4
    assert slot in engine.generating
    # 64 rows a step, the rest at the last one.
    assert left == [max(left[0] - 64 * k, 0) for k in range(len(left))] and len(left) - 1 == -(-left[0] // 64)
    while engine.busy():
        _codes_by_owner(engine, results)
    np.testing.assert_array_equal(np.concatenate(results[id(running)]).T, _alone(gen, running)[1])
    np.testing.assert_array_equal(np.concatenate(results[id(long_)]).T,
                                  gen.generate_codes([long_.text], speakers=1, contexts=[voice], seeds=5,
                                                     max_audio_ms=480)[0])


def test_partial_prefills_leave_nothing_behind(gen):
    """A request cancelled halfway through its prefill frees and empties its slot; a held slot's queued rows
    (two extends, appended in order) go in at the steps, a start waits for them, and a stop before they are in
    ends the reply with no frame; rewinding with rows queued is refused; release drops queued rows."""
    engine = Engine(gen.model, slots=2, frames_per_call=4, prefill_rows=64, clock=lambda: 0.0)
    rng = np.random.default_rng(12)
    voice = [Segment(1, "A voice prompt.", codes=rng.integers(0, 2048, (32, 200)))]
    slot = engine.submit(Request("Cancelled while prefilled.", context=voice, seed=1))
    rows = engine.waiting_rows(slot)
    engine.step()
    assert engine.waiting_rows(slot) == rows - 64 and int(engine.state.pos[slot]) == 64
    engine.cancel(slot)
    assert engine.waiting_rows(slot) == 0 and engine.free_slots() == [0, 1] and not engine.busy()
    assert int(engine.state.pos[slot]) == 0

    told = []
    held = engine.hold("a conversation")
    tokens, mask = gen.model.prompt([], 0, "Some words to append to the held slot.", 6)
    engine.extend(held, tokens[:5], mask[:5])
    engine.extend(held, tokens[5:], mask[5:])
    assert engine.waiting_rows(held) == len(tokens) and int(engine.state.pos[held]) == 0
    with pytest.raises(RuntimeError, match="rows waiting"):
        engine.rewind(held, 1)
    engine.start(held, seed=1, max_frames=6)
    assert held not in engine.generating
    with pytest.raises(RuntimeError, match="generating"):
        engine.extend(held, tokens, mask)
    engine.stop(held)
    while engine.busy():
        told += [ev for slot, ev in engine.step().items() if slot == held]
    assert told and told[-1].finished and sum(len(ev.codes) for ev in told) == 0
    assert int(engine.state.pos[held]) == len(tokens)
    engine.extend(held, tokens, mask)
    engine.release(held)
    assert engine.waiting_rows(held) == 0 and engine.free_slots() == [0, 1] and not engine.busy()
