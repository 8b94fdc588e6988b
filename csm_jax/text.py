"""Prompts for CSM: Llama-3 tokenization and the 33-column rows of a conversation (Sesame's csm/generator.py).

A segment (one turn: a speaker id, its text, and optionally its audio) becomes
  text rows:  <|begin_of_text|> [{speaker}]{text} <|end_of_text|>   (one token per row, column 32)
  audio rows: one per 80 ms Mimi frame (32 codes in columns 0..31), then one all-zero end-of-audio row.
A prompt is the context segments in order, then the target utterance's text rows only; generation starts
from its last row. Prompt rows plus the frames to generate must fit the backbone's 2048 positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
NUM_CODEBOOKS = 32
FRAME_SAMPLES = 1920


@dataclass
class Segment:
    """One turn of a conversation. `codes` (32, T) are Mimi codes; `audio` is 24 kHz mono (encoded on use)."""

    speaker: int
    text: str
    audio: np.ndarray | None = None
    codes: np.ndarray | None = None


def check_speaker(speaker) -> int:
    if isinstance(speaker, bool) or not isinstance(speaker, (int, np.integer)) or speaker < 0:
        raise ValueError(f"speaker must be a non-negative integer id (CSM writes it as '[0]', '[1]', ...), "
                         f"got {speaker!r}")
    return int(speaker)


def check_text(text) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text is empty: give the words to speak")
    return text.strip()


class Tokenizer:
    """The Llama-3 tokenizer (a tokenizer.json) as CSM uses it: every segment wrapped in begin/end of text."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer.json not found: {path}")
        self.tok = HFTokenizer.from_file(str(path))
        self.bos, self.eos = self.tok.token_to_id(BEGIN_OF_TEXT), self.tok.token_to_id(END_OF_TEXT)
        if self.bos is None or self.eos is None:
            raise ValueError(f"{path} is not a Llama-3 tokenizer (no {BEGIN_OF_TEXT} / {END_OF_TEXT} tokens)")

    def segment_ids(self, speaker: int, text: str) -> list[int]:
        body = self.tok.encode(f"[{check_speaker(speaker)}]{check_text(text)}", add_special_tokens=False).ids
        return [self.bos, *body, self.eos]


def text_rows(ids) -> tuple[np.ndarray, np.ndarray]:
    n = len(ids)
    tokens = np.zeros((n, NUM_CODEBOOKS + 1), np.int32)
    mask = np.zeros((n, NUM_CODEBOOKS + 1), bool)
    tokens[:, -1] = ids
    mask[:, -1] = True
    return tokens, mask


def audio_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes (32, T) -> T audio rows plus the all-zero end-of-audio row."""
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != NUM_CODEBOOKS:
        raise ValueError(f"segment codes must be shaped (32, frames), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= 2048):
        raise ValueError("segment codes must lie in [0, 2048)")
    T = codes.shape[1]
    tokens = np.zeros((T + 1, NUM_CODEBOOKS + 1), np.int32)
    mask = np.zeros((T + 1, NUM_CODEBOOKS + 1), bool)
    tokens[:T, :NUM_CODEBOOKS] = codes.T
    mask[:, :NUM_CODEBOOKS] = True
    return tokens, mask


def segment_rows(tok: Tokenizer, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
    t, m = text_rows(tok.segment_ids(seg.speaker, seg.text))
    if seg.codes is None:
        if seg.audio is not None:
            raise ValueError("encode the segment's audio with Mimi first (Segment.codes)")
        return t, m
    a, am = audio_rows(seg.codes)
    return np.concatenate([t, a]), np.concatenate([m, am])


def build_prompt(tok: Tokenizer, context: list[Segment], speaker: int, text: str, max_frames: int,
                 max_seq_len: int = 2048, drop_oldest: bool = False,
                 pinned: int = 0) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows for `context` + the target's text. -> (tokens (S, 33), mask (S, 33), context segments dropped).

    Raises ValueError when the rows plus `max_frames` exceed `max_seq_len`, unless `drop_oldest`, which
    drops whole context segments, oldest first, until it fits; the first `pinned` segments (a voice prompt)
    are never dropped.
    """
    target = text_rows(tok.segment_ids(speaker, text))
    parts = [segment_rows(tok, s) for s in context]
    budget = max_seq_len - max_frames
    dropped = 0
    while len(parts) > pinned and sum(len(p[0]) for p in parts) + len(target[0]) > budget and drop_oldest:
        parts.pop(pinned)
        dropped += 1
    n = sum(len(p[0]) for p in parts) + len(target[0])
    if n > budget:
        raise ValueError(
            f"prompt too long: {n} rows of context and text plus {max_frames} frames of audio to generate exceed "
            f"the model's {max_seq_len} positions. Shorten the context or the text, lower max_audio_ms, or allow "
            "dropping the oldest context segments")
    tokens = np.concatenate([p[0] for p in parts] + [target[0]])
    mask = np.concatenate([p[1] for p in parts] + [target[1]])
    return tokens, mask, dropped


_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+|(?<=[.!?…][\"'”’)\]])\s+")


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Splits text at sentence ends; a sentence longer than `max_chars` is split further at commas or spaces."""
    out = []
    for s in _SENTENCE_END.split(check_text(text)):
        s = s.strip()
        while len(s) > max_chars:
            cut = max(s.rfind(", ", 0, max_chars), s.rfind(" ", 0, max_chars))
            cut = cut if cut > 0 else max_chars
            out.append(s[:cut + 1].strip())
            s = s[cut + 1:].strip()
        if s:
            out.append(s)
    return out
