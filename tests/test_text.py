"""Prompt rows with the real Llama-3 tokenizer, against transformers' CsmProcessor."""

import json
import os

import numpy as np
import pytest

from csm_jax.text import Segment, SentenceCutter, Tokenizer, build_prompt, split_sentences

TOKENIZER = os.environ.get("CSM_JAX_TEST_TOKENIZER", "")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(TOKENIZER)


def _processor(tmp_path):
    """CsmProcessor built offline: Llama-3's tokenizer.json with reserved tokens 0/1 renamed to <|AUDIO|> and
    <|audio_eos|>, as sesame/csm-1b's tokenizer has them."""
    from transformers import CsmProcessor, EncodecFeatureExtractor, PreTrainedTokenizerFast

    t = json.load(open(TOKENIZER))
    for entry in t["added_tokens"]:
        entry["content"] = {128002: "<|AUDIO|>", 128003: "<|audio_eos|>"}.get(entry["id"], entry["content"])
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(t))
    tk = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                 pad_token="<|end_of_text|>")
    return CsmProcessor(feature_extractor=EncodecFeatureExtractor(feature_size=1, sampling_rate=24000), tokenizer=tk)


def test_two_speaker_conversation_matches_csm_processor(tok, tmp_path):
    turns = [(0, "Hey, did you catch the game last night?", 30000), (1, "I did! That last-minute goal was unreal.", 9600),
             (0, "Right? I couldn't believe it.", 4001)]
    target = (1, "Me neither, honestly.")
    rng = np.random.default_rng(0)
    context = [Segment(s, t, codes=rng.integers(0, 2048, (32, -(-n // 1920)))) for s, t, n in turns]
    tokens, mask, dropped = build_prompt(tok, context, *target, max_frames=125)
    assert dropped == 0
    # Our rows as the processor's flat ids: text rows -> their token, audio rows -> <|AUDIO|>, EOS row -> <|audio_eos|>.
    ours = []
    for row_t, row_m in zip(tokens, mask):
        if row_m[32]:
            ours.append(int(row_t[32]))
        else:
            ours.append(128003 if not row_t[:32].any() else 128002)
    # The chat template's rendering of each turn (transformers' convert_csm.py): text, then audio, then audio EOS.
    text = "".join(f"<|begin_of_text|>[{s}]{t}<|end_of_text|><|AUDIO|><|audio_eos|>" for s, t, _ in turns)
    text += f"<|begin_of_text|>[{target[0]}]{target[1]}<|end_of_text|>"
    audio = [np.zeros(n, np.float32) for _, _, n in turns]
    ref = _processor(tmp_path)(text=[text], audio=[audio], add_special_tokens=False, return_tensors="pt")
    assert ours == ref["input_ids"][0].tolist()
    # Hand check of the speaker prefix with the real vocabulary: "[1]" is tokens 58, 16, 60.
    assert tok.segment_ids(1, "Hi")[:4] == [128000, 58, 16, 60]
    # Audio rows carry the codes; the EOS row is 32 zeros with the audio mask on.
    np.testing.assert_array_equal(tokens[len(tok.segment_ids(0, turns[0][1])), :32], context[0].codes[:, 0])


def test_budget_and_dropping(tok):
    ctx = [Segment(0, "one", codes=np.zeros((32, 600), np.int64)), Segment(1, "two", codes=np.zeros((32, 600), np.int64))]
    with pytest.raises(ValueError, match="prompt too long"):
        build_prompt(tok, ctx, 0, "three", max_frames=900)
    tokens, _, dropped = build_prompt(tok, ctx, 0, "three", max_frames=900, drop_oldest=True)
    assert dropped == 1 and len(tokens) == len(tok.segment_ids(1, "two")) + 601 + len(tok.segment_ids(0, "three"))
    with pytest.raises(ValueError, match="prompt too long"):
        build_prompt(tok, [], 0, "word " * 3000, max_frames=100, drop_oldest=True)


@pytest.mark.parametrize("speaker", ["1", 1.0, -1, True, None])
def test_bad_speaker(tok, speaker):
    with pytest.raises(ValueError, match="speaker must be a non-negative integer"):
        tok.segment_ids(speaker, "hello")


def test_empty_text(tok):
    with pytest.raises(ValueError, match="text is empty"):
        tok.segment_ids(0, "   ")


def test_split_sentences():
    """One rule with the conversation's streamed cutter (tests/test_converse.py: test_sentence_cutter)."""
    assert split_sentences('Hello there. "How are you?" she asked!  Fine') == [
        "Hello there.", '"How are you?"', "she asked!", "Fine"]
    long = "word, " * 100
    parts = split_sentences(long, max_chars=120)
    assert all(len(p) <= 120 for p in parts) and " ".join(parts).split() == long.split()
    # A blank line ends a sentence; white space runs (line breaks too) become one space.
    assert split_sentences("Chapter One\n\nIt was  late,\nand dark.") == ["Chapter One", "It was late, and dark."]
    assert split_sentences("He said (\"no.\") Then left.") == ['He said ("no.")', "Then left."]
    assert split_sentences("x" * 25, max_chars=10) == ["x" * 10, "x" * 10, "x" * 5]  # a word that long
    assert split_sentences("Yes. ... No!") == ["Yes.", "No!"]  # a piece without words is not spoken
    with pytest.raises(ValueError, match="no words to speak"):
        split_sentences("... !")
    # The same sentences whether the text comes whole or in pieces.
    text = 'One, two. "Three?" Four!\n\nFive ' + "six " * 40
    c = SentenceCutter(max_chars=60)
    pieces = [p for i in range(0, len(text), 7) for p in c.feed(text[i:i + 7])] + c.flush()
    assert pieces == split_sentences(text, max_chars=60)
