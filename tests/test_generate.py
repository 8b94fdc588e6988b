"""csm_jax.generate on a tiny random checkpoint: batching, streaming, seeds, contexts."""

import numpy as np
import pytest

from csm_jax.generate import Generator
from csm_jax.testing.inputs import speech_like
from csm_jax.text import Segment


@pytest.fixture(scope="module")
def gen(csm_dir):
    return Generator(str(csm_dir), frames_per_call=4)


def test_batch_equals_alone_and_seeds(gen):
    texts = ["Hello there.", "A somewhat longer sentence, to give this row a longer prompt."]
    batch = gen.generate(texts, speakers=[0, 1], seeds=[5, 6], max_audio_ms=[640, 960], return_codes=True)
    for i, (audio, codes) in enumerate(batch):
        alone_audio, alone_codes = gen.generate(texts[i], speakers=[0, 1][i], seeds=[5, 6][i],
                                                max_audio_ms=[640, 960][i], return_codes=True)
        np.testing.assert_array_equal(codes, alone_codes)
        np.testing.assert_allclose(audio, alone_audio, rtol=0, atol=1e-5 * np.abs(alone_audio).max())
        assert codes.shape[0] == 32 and codes.max() < 2048 and audio.shape == (1920 * codes.shape[1],)
    assert batch[0][1].shape[1] <= 8 and batch[1][1].shape[1] <= 12  # frame caps from max_audio_ms
    other = gen.generate(texts[0], seeds=7, max_audio_ms=640, return_codes=True)[1]
    assert not np.array_equal(other, batch[0][1])


def test_stream_concatenates_to_one_shot(gen):
    ctx = [Segment(0, "Earlier words.", audio=speech_like(24000, seed=3))]
    one = gen.generate("Streaming test.", speakers=1, contexts=ctx, seeds=3, max_audio_ms=1200)
    chunks = list(gen.stream("Streaming test.", speaker=1, context=ctx, seed=3, max_audio_ms=1200))
    assert len(chunks) >= 2 and all(len(c) % 1920 == 0 for c in chunks)
    got = np.concatenate(chunks)
    assert got.shape == one.shape
    assert np.abs(got - one).max() <= 1e-5 * np.abs(one).max()


@pytest.mark.slow
def test_interleaved_streams_each_equal_their_solo_run(gen):
    """Two streams consumed in turns from one generator: a short prompt, and one whose context puts its
    positions past 256 (attention windows differ), each yield exactly what they yield alone."""
    ctx = [Segment(0, "A long earlier turn.", codes=np.random.default_rng(1).integers(0, 2048, (32, 280)))]
    kw = [dict(text="A short prompt.", seed=1, max_audio_ms=960),
          dict(text="The long-context stream.", speaker=1, context=ctx, seed=2, max_audio_ms=960)]
    solo = [np.concatenate(list(gen.stream(**k))) for k in kw]
    streams, got = [gen.stream(**k) for k in kw], [[], []]
    live = [0, 1]
    while live:
        for i in list(live):
            try:
                got[i].append(next(streams[i]))
            except StopIteration:
                live.remove(i)
    for i in range(2):
        np.testing.assert_array_equal(np.concatenate(got[i]), solo[i])
    one = gen.generate(kw[1]["text"], speakers=1, contexts=ctx, seeds=2, max_audio_ms=960)
    np.testing.assert_array_equal(solo[1], one)


@pytest.mark.slow
def test_paragraph_sentences_appended_equal_the_reprefilled_history(gen):
    """generate_paragraphs appends each sentence to its utterance's slot; the codes equal re-prefilling the
    growing history (voice prompt + earlier sentences as segments, Sesame's way) with the same seeds."""
    from csm_jax.text import split_sentences

    voice = [Segment(1, "My voice.", codes=np.random.default_rng(2).integers(0, 2048, (32, 12)))]
    texts = ["First sentence here. And a second one! Then a third?", "Only one sentence."]
    got = gen.generate_paragraphs(texts, speaker=1, context=voice, seeds=[10, 20], max_audio_ms=400, batch_size=2)
    for i, text in enumerate(texts):
        done = []
        for r, sentence in enumerate(split_sentences(text)):
            ctx = voice + [Segment(1, s, codes=c) for s, c in zip(split_sentences(text), done)]
            done.append(gen.generate_codes([sentence], speakers=1, contexts=[ctx], seeds=[10, 20][i] + r,
                                           max_audio_ms=400)[0])
        np.testing.assert_array_equal(got[i], np.concatenate(done, 1))
    assert len(split_sentences(texts[0])) == 3


def test_greedy_is_deterministic_and_context_matters(gen):
    a = gen.generate("Same words.", temperature=0.0, max_audio_ms=480, return_codes=True)[1]
    b = gen.generate("Same words.", temperature=0.0, seeds=123, max_audio_ms=480, return_codes=True)[1]
    np.testing.assert_array_equal(a, b)
    ctx = [Segment(1, "Something said before.", codes=np.random.default_rng(0).integers(0, 2048, (32, 10)))]
    c = gen.generate("Same words.", contexts=ctx, temperature=0.0, max_audio_ms=480, return_codes=True)[1]
    assert not np.array_equal(a, c)


def test_bad_arguments(gen):
    with pytest.raises(ValueError, match="text is empty"):
        gen.generate("  ")
    with pytest.raises(ValueError, match="speaker must be"):
        gen.generate("hi", speakers="x")
    with pytest.raises(ValueError, match="one per text"):
        gen.generate(["a", "b"], seeds=[1])
    with pytest.raises(ValueError, match="max_audio_ms"):
        gen.generate("hi", max_audio_ms=10)
    # The sampler would read these as greedy or clip them: refused instead.
    with pytest.raises(ValueError, match="temperature must be a number, 0 .greedy. or more, got -0.5"):
        gen.generate("hi", temperature=-0.5)
    with pytest.raises(ValueError, match="temperature must be"):
        gen.generate("hi", temperature=float("nan"))
    with pytest.raises(ValueError, match="topk must be an integer from 1 to 2048, got 0"):
        gen.generate("hi", topk=0)
    with pytest.raises(ValueError, match="NaN"):
        gen.generate("hi", contexts=[Segment(0, "x", audio=np.full(100, np.nan, np.float32))])


@pytest.mark.slow
def test_encode_audio_pads_to_few_shapes_without_changing_codes(gen):
    """encode_audio pads whole-frame audio to a bucketed length (few compilations): causal Mimi gives the same
    codes. A partial last frame is encoded as it is (Mimi pads it in its own way)."""
    import jax.numpy as jnp

    from csm_jax.mimi import encode

    for n in (1000, 24000 + 77, 1920 * 5, 1920 * 13, 3 * 24000):
        audio = speech_like(n, seed=n)
        direct = np.asarray(encode(gen.model.mimi, jnp.asarray(audio[None])))[0]
        np.testing.assert_array_equal(gen.model.encode_audio(audio), direct)
