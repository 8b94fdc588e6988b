"""csm_jax.dialogue: a conversation's context appended to the KV cache equals Sesame's full re-prefill."""

import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from csm_jax import csm
from csm_jax.dialogue import Dialogue
from csm_jax.generate import Generator
from csm_jax.testing.inputs import speech_like
from csm_jax.text import Segment, build_prompt


@pytest.fixture(scope="module")
def gen(csm_dir):
    return Generator(str(csm_dir), frames_per_call=4)


@pytest.fixture
def driver(gen):
    """A driver of two slots, its thread stepping the engine (dialogues wait for it)."""
    with gen.driver(2) as driver:
        yield driver


def fresh_hidden(gen, segments, speaker, text):
    """The reference way: the whole history as one prompt, prefilled from position 0 -> (h, rows)."""
    tokens, mask, _ = build_prompt(gen.model.tokenizer, segments, speaker, text, 1)
    st = csm.GenState.create(gen.model.cfg, 1)
    st = csm.prefill(gen.model.params, gen.model.cfg, st, jnp.asarray(tokens[None]), jnp.asarray(mask[None]),
                     jnp.array([len(tokens)], jnp.int32))
    return np.asarray(st.h[0]), len(tokens)


def _hidden(d):
    """The last hidden state of the dialogue's slot (read while the driver's thread has nothing to do)."""
    return np.asarray(d.driver.engine.state.h[d.slot])


@pytest.mark.slow
def test_appended_turns_equal_full_prompt(gen, driver):
    voice = [Segment(1, "This is how I sound.", audio=speech_like(24000, 1))]
    user_audio = [speech_like(24000, 2), speech_like(12000, 3)]
    d = Dialogue(driver, voice)
    start = d.rows
    user1 = d.add(Segment(0, "Hello, can you hear me?", audio=user_audio[0]))
    np.testing.assert_array_equal(user1.codes, gen.model.encode_audio(user_audio[0]))
    history = list(d.segments)
    chunks = list(d.speak("Yes, I can hear you.", seed=3, max_audio_ms=480))
    reply1 = d.segments[-1]
    assert reply1.speaker == 1 and 0 < reply1.codes.shape[1] <= 6
    np.testing.assert_allclose(np.concatenate(chunks), gen.model.decode_codes(reply1.codes), rtol=0, atol=1e-5)
    # The reply is what Sesame's way (the whole history as one prompt) generates with the same seed.
    ref = gen.generate_codes(["Yes, I can hear you."], speakers=1, contexts=[history], seeds=3, max_audio_ms=480)
    np.testing.assert_array_equal(reply1.codes, ref[0])

    d.add(Segment(0, "Good. Tell me more.", audio=user_audio[1]))
    history = list(d.segments)
    assert [s.speaker for s in history] == [1, 0, 1, 0]
    reply2 = list(d.speak("Sure thing, here is more.", seed=4, max_audio_ms=400))
    ref = gen.generate_codes(["Sure thing, here is more."], speakers=1, contexts=[history], seeds=4,
                             max_audio_ms=400)
    np.testing.assert_array_equal(d.segments[-1].codes, ref[0])
    assert reply2 and d.rebuilds == 0 and d.appended_rows == d.rows - start  # appended turn by turn, no rebuild

    # The cache built turn by turn holds what a from-scratch prefill of the history holds.
    ref_h, n = fresh_hidden(gen, d.segments, 0, "And now?")
    d.add(Segment(0, "And now?"))
    assert d.rows == n and d.rebuilds == 0
    np.testing.assert_allclose(_hidden(d), ref_h, rtol=0, atol=1e-4 * np.abs(ref_h).max())


def random_codes(rng, frames):
    return rng.integers(0, 2048, (32, frames)).astype(np.int32)


@pytest.mark.slow
def test_history_outgrowing_the_cache_drops_oldest_and_rebuilds(gen, driver):
    rng = np.random.default_rng(1)
    voice = [Segment(1, "My voice.", codes=random_codes(rng, 100))]
    d = Dialogue(driver, voice)
    for i in range(3):
        d.add(Segment(0, f"Turn number {i}.", codes=random_codes(rng, 550)), reserve=20)
    assert d.rebuilds == 0 and d.rows > 1500
    d.add(Segment(0, "Turn number 3.", codes=random_codes(rng, 550)), reserve=20)
    assert d.rebuilds == 1 and d.dropped == 1 and d.rows <= d.capacity - 20
    texts = [s.text for s in d.segments]
    assert texts == ["My voice.", "Turn number 1.", "Turn number 2.", "Turn number 3."]  # voice pinned
    # After the rebuild the state is the fresh prefill of what remained plus what was appended since.
    h_full, n_full = fresh_hidden(gen, d.segments, 0, "Next.")
    d.add(Segment(0, "Next."))
    assert d.rows == n_full
    np.testing.assert_allclose(_hidden(d), h_full, rtol=0, atol=1e-4 * np.abs(h_full).max())

    # A reply still fits and speaks after the history was cut; positions never pass the trained range.
    audio = np.concatenate(list(d.speak("Still here.", seed=1, max_audio_ms=240)))
    assert audio.size > 0 and d.rows <= d.capacity


@pytest.mark.slow
def test_turn_longer_than_the_cache_keeps_its_latest_frames(gen, driver):
    rng = np.random.default_rng(2)
    d = Dialogue(driver, [Segment(1, "Voice.", codes=random_codes(rng, 50))])
    d.add(Segment(0, "Earlier.", codes=random_codes(rng, 300)))
    long_codes = random_codes(rng, 2500)
    stored = d.add(Segment(0, "A very long turn.", codes=long_codes), reserve=100)
    assert [s.text for s in d.segments] == ["Voice.", "A very long turn."]  # the earlier turn left too
    T = stored.codes.shape[1]
    assert 1500 < T < 2048 and d.rows == d.capacity - 100
    np.testing.assert_array_equal(stored.codes, long_codes[:, -T:])
    assert np.concatenate(list(d.speak("Okay.", seed=0, max_audio_ms=160))).size > 0
    assert d.segments[-1].text == "Okay." and d.rows <= d.capacity


@pytest.mark.slow
def test_cancel_keeps_what_was_spoken(gen, driver):
    d = Dialogue(driver)
    cancel = threading.Event()
    got = []
    for chunk in d.speak("A reply that the user interrupts.", seed=2, max_audio_ms=4000, cancel=cancel):
        got.append(chunk)
        cancel.set()  # barge-in after the first chunk
    seg = d.segments[-1]
    assert len(got) == 1 and seg.codes.shape[1] == got[0].size // 1920 <= gen.frames_per_call
    h_full, n = fresh_hidden(gen, d.segments, 0, "Wait.")
    d.add(Segment(0, "Wait."))
    assert d.rows == n  # the interrupted reply is closed by its end-of-audio row, as a finished one is
    np.testing.assert_allclose(_hidden(d), h_full, rtol=0, atol=1e-4 * np.abs(h_full).max())


def test_bad_inputs(gen, driver):
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="voice prompt .pinned context. takes"):
        Dialogue(driver, [Segment(1, "Huge.", codes=random_codes(rng, 1500))])
    d = Dialogue(driver)
    with pytest.raises(ValueError, match="max_audio_ms"):
        list(d.speak("Hi.", max_audio_ms=10))
    with pytest.raises(ValueError, match="text is empty"):
        list(d.speak("   "))
    with pytest.raises(ValueError, match="temperature must be"):
        list(d.speak("Hi.", temperature=-1))
    with pytest.raises(ValueError, match="topk must be"):
        list(d.speak("Hi.", topk=4096))
    assert d.rows == 0 and d.segments == []  # nothing half-appended


@pytest.mark.slow
def test_turn_audio_of_any_length_compiles_nothing_after_the_encoder_warm_up(gen):
    """A conversation's turns come in every length: padded to whole frames (audio.whole_frames), they run the
    encoder programs `warm_encoder` compiled, with the codes of the padded audio encoded directly."""
    import jax

    from csm_jax.audio import whole_frames
    from csm_jax.mimi import encode

    assert gen.model.warm_encoder(2.5) == 4  # 2.5 s = 32 frames: buckets of 4, 8, 16 and 32 frames
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    rng = np.random.default_rng(3)
    turns = [whole_frames(0.1 * rng.standard_normal(n).astype(np.float32)) for n in (7001, 1920 * 11 + 5, 59_999)]
    codes = [gen.model.encode_audio(a) for a in turns]
    n_compiled = len(compiles)
    assert n_compiled == 0, compiles
    for a, c in zip(turns, codes):
        assert a.size % 1920 == 0 and c.shape == (32, a.size // 1920)
        np.testing.assert_array_equal(c, np.asarray(encode(gen.model.mimi, jnp.asarray(a[None])))[0])


@pytest.mark.slow
def test_turns_prefilled_across_steps_beside_a_running_stream(gen):
    """On an engine that prefills 64 rows a step, a conversation's voice prompt and long user turn (several
    pieces each), queued while a plain request generates, go in over several steps: the request gets its four
    frames at every one of them, its codes equal its solo run, and the reply equals Sesame's way (the whole
    history as one prompt, alone). A frozen clock keeps the schedule's row budget at prefill_rows."""
    from csm_jax.request import Request

    driver = gen.driver(2, prefill_rows=64, clock=lambda: 0.0)
    engine = driver.engine
    rng = np.random.default_rng(5)
    running = Request("A plain request speaking meanwhile.", seed=7, max_audio_ms=6000)
    frames, finished = [], threading.Event()
    driver.submit(running, lambda ev: (frames.append(ev.codes), ev.finished and finished.set()))
    steps = []  # frames events the running request got at each step since the dialogue began
    real_step = engine.step

    def step():
        out = real_step()
        if counting:
            steps.append([len(ev.codes) for ev in out.values() if ev.owner.owner is running])
        return out

    counting = False
    engine.step = step
    with driver:
        while len(frames) < 1:  # the request generates
            time.sleep(0.01)
        counting = True
        d = Dialogue(driver, [Segment(1, "My voice.", codes=random_codes(rng, 150))])
        d.add(Segment(0, "A long user turn.", codes=random_codes(rng, 120)))
        counting = False
        assert d.rows > 4 * 64 and len(steps) >= -(-d.rows // 64)  # prefilled 64 rows a step, by the driver's steps
        assert steps == [[4]] * len(steps)
        history = list(d.segments)
        reply = list(d.speak("A reply.", seed=8, max_audio_ms=480))
        assert finished.wait(300)
        ref = gen.generate_codes(["A reply."], speakers=1, contexts=[history], seeds=8, max_audio_ms=480)
        np.testing.assert_array_equal(d.segments[-1].codes, ref[0])
        assert sum(c.size for c in reply) == 1920 * ref[0].shape[1]
        alone = gen.generate_codes([running.text], seeds=7, max_audio_ms=6000)[0]
        np.testing.assert_array_equal(np.concatenate(frames).T, alone)
        d.close()


@pytest.mark.slow
def test_driven_engine_prefills_the_queued_turns(gen):
    """With the driver's thread stepping the engine (as the server's), a dialogue's turn is queued by the
    caller and `add` returns once it is in; the reply starts when its rows are in: it equals Sesame's way (the
    whole history as one prompt, alone)."""
    with gen.driver(2, prefill_rows=64) as driver:
        rng = np.random.default_rng(6)
        d = Dialogue(driver, [Segment(1, "My voice.", codes=random_codes(rng, 100))])
        d.add(Segment(0, "A user turn.", codes=random_codes(rng, 80)))
        history = list(d.segments)
        reply = list(d.speak("A reply.", seed=9, max_audio_ms=480))
    ref = gen.generate_codes(["A reply."], speakers=1, contexts=[history], seeds=9, max_audio_ms=480)
    np.testing.assert_array_equal(d.segments[-1].codes, ref[0])
    assert sum(c.size for c in reply) == 1920 * ref[0].shape[1]
    d.close()
