"""Prompts for CSM: Llama-3 tokenization and the 33-column rows of a conversation (Sesame's csm/generator.py).

A segment (one turn: a speaker id, its text, and optionally its audio) becomes
  text rows:  <|begin_of_text|> [{speaker}]{text} <|end_of_text|>   (one token per row, column 32)
  audio rows: one per 80 ms Mimi frame (32 codes in columns 0..31), then one all-zero end-of-audio row.
A prompt is the context segments in order, then the target utterance's text rows only; generation starts
from its last row. Prompt rows plus the frames to generate must fit the backbone's 2048 positions.

Long text is spoken a sentence at a time, cut by one rule: SentenceCutter as the text streams in (an LLM's
reply), split_sentences over a whole text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
NUM_CODEBOOKS = 32


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


_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s)|\n\s*\n")


class SentenceCutter:
    """Sentences from text that arrives in pieces (an LLM's streamed reply); `split_sentences` is the same rule
    over a whole text. A sentence ends at . ! ? … (and any closing quotes or brackets) followed by white
    space, or at a blank line; one longer than `max_chars` is cut at its last ", " or space (in a word that
    long, at `max_chars`). Runs of white space become one space; a piece without a letter or digit is dropped.
    No abbreviation rules: "Dr. Smith" is two sentences."""

    def __init__(self, max_chars: int = 250):
        if max_chars < 1:
            raise ValueError(f"max_chars must be at least 1, got {max_chars}")
        self.buf, self.max_chars = "", max_chars

    def feed(self, text: str) -> list[str]:
        """The sentences `text` completes (a sentence's end is known once the white space after it arrives)."""
        self.buf += text
        out = []
        while True:
            m = _SENTENCE_END.search(self.buf)
            if m is None or m.end() > self.max_chars:
                if len(self.buf) <= self.max_chars:
                    break
                cut = max(self.buf.rfind(", ", 0, self.max_chars), self.buf.rfind(" ", 0, self.max_chars))
                cut = cut + 1 if cut > 0 else self.max_chars
            else:
                cut = m.end()
            out += _sentence(self.buf[:cut])
            self.buf = self.buf[cut:]
        return out

    def flush(self) -> list[str]:
        """The rest, at the end of the text."""
        rest, self.buf = self.buf, ""
        return _sentence(rest)


def _sentence(piece: str) -> list[str]:
    piece = " ".join(piece.split())
    return [piece] if re.search(r"\w", piece) else []


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """The sentences of `text` by SentenceCutter's rule; raises ValueError when it has no words to speak."""
    cutter = SentenceCutter(max_chars)
    out = cutter.feed(check_text(text)) + cutter.flush()
    if not out:
        raise ValueError(f"no words to speak in {text.strip()[:80]!r}: give text with letters or digits")
    return out
