"""Training data: utterances with transcripts -> Mimi codes cached on disk -> length-bucketed batches.

Sources:
  folder    NAME.wav (or .flac/.ogg/.mp3) + NAME.txt, optionally NAME.json {"speaker": 1}; speaker 0 otherwise.
  manifest  a .jsonl file, one example per line: {"audio": "a.wav", "text": "...", "speaker": 0,
            "context": [{"audio": "b.wav", "text": "...", "speaker": 1}, ...]} (paths relative to the file;
            context: earlier turns of a conversation, in order, placed before the utterance).
Every audio file is Mimi-encoded once, in batches, into CACHE/codes/<hash>.npy (int16 (32, frames)); the
hash covers the path, size and modification time, so an edited file is encoded again. CACHE/index.jsonl
lists the usable examples; CACHE/skipped.txt the bad ones with why (unreadable audio, empty text or audio,
too long for the backbone's positions): they are printed and skipped, never dropped silently.

An example's rows are what the generator's prompts are made of (csm_jax.text): for each segment its text
rows then its audio frames and the all-zero end-of-audio row. Labels (the targets of the loss) are the
codes of the audio rows: of the utterance, and of the context turns too unless `context_loss` is off
(transformers' processor labels every audio frame of its input).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from csm_jax.audio import FRAME_SAMPLES
from csm_jax.text import NUM_CODEBOOKS, Segment, Tokenizer, segment_rows

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")
IGNORE = -100


@dataclass
class Turn:
    audio: str
    text: str
    speaker: int = 0


@dataclass
class Example:
    name: str
    turns: list[Turn]  # context turns, then the utterance


def _turn(d: dict, root: Path, where: str) -> Turn:
    if not isinstance(d, dict) or "audio" not in d or "text" not in d:
        raise ValueError(f"{where}: each entry needs 'audio' and 'text' (and optionally 'speaker', 'context')")
    speaker = d.get("speaker", 0)
    if isinstance(speaker, bool) or not isinstance(speaker, int) or speaker < 0:
        raise ValueError(f"{where}: 'speaker' must be a non-negative integer, got {speaker!r}")
    audio = Path(d["audio"])
    return Turn(str(audio if audio.is_absolute() else root / audio), str(d["text"]), speaker)


def read_examples(source: str | os.PathLike) -> tuple[list[Example], list[tuple[str, str]]]:
    """-> (examples, bad (name, reason)). `source` is a folder of NAME.wav + NAME.txt or a .jsonl manifest."""
    source = Path(source)
    bad: list[tuple[str, str]] = []
    examples: list[Example] = []
    if source.is_dir():
        for audio in sorted(p for p in source.iterdir() if p.suffix.lower() in AUDIO_EXTS):
            txt = audio.with_suffix(".txt")
            if not txt.is_file():
                bad.append((audio.name, f"no transcript {txt.name} beside it"))
                continue
            speaker = 0
            meta = audio.with_suffix(".json")
            if meta.is_file():
                try:
                    speaker = _turn({"audio": audio.name, "text": "", **json.loads(meta.read_text())}, source,
                                    str(meta)).speaker
                except (ValueError, json.JSONDecodeError) as e:
                    bad.append((audio.name, f"bad {meta.name}: {e}"))
                    continue
            examples.append(Example(audio.stem, [Turn(str(audio), txt.read_text(), speaker)]))
        if not examples and not bad:
            raise ValueError(f"{source}: no audio files ({', '.join(AUDIO_EXTS)}) found; give a folder of "
                             "NAME.wav + NAME.txt pairs or a .jsonl manifest")
    elif source.is_file():
        for i, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{source.name}:{i}"
            try:
                d = json.loads(line)
                context = d.get("context", []) if isinstance(d, dict) else []
                if not isinstance(context, list):
                    raise ValueError(f"{where}: 'context' must be a list of turns")
                turns = [_turn(c, source.parent, where) for c in context] + [_turn(d, source.parent, where)]
            except (ValueError, json.JSONDecodeError) as e:
                bad.append((where, str(e)))
                continue
            examples.append(Example(d.get("name", where), turns))
    else:
        raise FileNotFoundError(f"training data not found: {source} (give a folder or a .jsonl manifest)")
    return examples, bad


def _audio_key(path: str) -> str:
    st = os.stat(path)
    return hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:20]


def encode_files(mimi_params, paths: list[str], out_dir: Path, batch_size: int = 8,
                 log=print) -> tuple[dict[str, str], dict[str, str]]:
    """Mimi-encodes each audio file once (batched; whole frames, zero-padded: the encoder is causal, so the
    padding leaves the codes of real frames as they are). -> ({path: code file}, {path: why it failed})."""
    import jax.numpy as jnp

    from csm_jax.audio import load_audio
    from csm_jax.bundle import bucket
    from csm_jax.mimi import encode

    out_dir.mkdir(parents=True, exist_ok=True)
    done, failed, todo = {}, {}, []
    for p in dict.fromkeys(paths):
        try:
            f = out_dir / f"{_audio_key(p)}.npy"
        except OSError as e:
            failed[p] = f"cannot read audio: {e.strerror or e}"
            continue
        if f.is_file():
            done[p] = f.name
        else:
            todo.append((p, f))
    loaded = []
    for p, f in todo:
        try:
            audio = load_audio(p)
        except (ValueError, OSError) as e:
            failed[p] = str(e).split(". ")[0]
            continue
        loaded.append((p, f, audio))
    loaded.sort(key=lambda x: x[2].size)  # similar lengths share a batch
    for i in range(0, len(loaded), batch_size):
        chunk = loaded[i:i + batch_size]
        frames = [-(-a.size // FRAME_SAMPLES) for _, _, a in chunk]
        T = bucket(max(frames), 4)
        x = np.zeros((batch_size, T * FRAME_SAMPLES), np.float32)
        for j, (_, _, a) in enumerate(chunk):
            x[j, :a.size] = a
        codes = np.asarray(encode(mimi_params, jnp.asarray(x)))
        for j, (p, f, _) in enumerate(chunk):
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, codes[j, :, :frames[j]].astype(np.int16))
            os.replace(tmp, f)
            done[p] = f.name
        log(f"encoded {min(i + batch_size, len(loaded))}/{len(loaded)} audio files with Mimi")
    return done, failed


def build_cache(source, cache_dir, mimi_params, tokenizer: Tokenizer, max_seq_len: int = 2048,
                batch_size: int = 8, log=print) -> tuple[Path, list[tuple[str, str]]]:
    """Reads `source`, encodes its audio into `cache_dir`, writes index.jsonl and skipped.txt.
    -> (index path, bad (name, reason)); each bad example is also logged."""
    cache = Path(cache_dir)
    examples, bad = read_examples(source)
    codes_dir = cache / "codes"
    files, failed = encode_files(mimi_params, [t.audio for e in examples for t in e.turns], codes_dir,
                                 batch_size, log)
    index = []
    for ex in examples:
        why = next((f"{t.audio}: {failed[t.audio]}" for t in ex.turns if t.audio in failed), None)
        rows = 0
        if why is None:
            for t in ex.turns:
                if not t.text.strip():
                    why = f"{t.audio}: empty transcript"
                    break
                n = np.load(codes_dir / files[t.audio], mmap_mode="r").shape[1]
                if n == 0:
                    why = f"{t.audio}: empty audio"
                    break
                rows += len(tokenizer.segment_ids(t.speaker, t.text)) + n + 1
            else:
                if rows > max_seq_len:
                    why = (f"too long: {rows} rows (text, frames and end-of-audio rows of all its turns) exceed "
                           f"the model's {max_seq_len} positions; split it or drop context turns")
        if why is not None:
            bad.append((ex.name, why))
            continue
        index.append({"name": ex.name, "rows": rows,
                      "turns": [{"codes": files[t.audio], "text": t.text.strip(), "speaker": t.speaker}
                                for t in ex.turns]})
    for name, why in bad:
        log(f"skipped {name}: {why}")
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "skipped.txt").write_text("".join(f"{n}\t{w}\n" for n, w in bad))
    path = cache / "index.jsonl"
    tmp = cache / "index.jsonl.tmp"
    tmp.write_text("".join(json.dumps(e) + "\n" for e in index))
    os.replace(tmp, path)
    if not index:
        raise ValueError(f"{source}: no usable examples ({len(bad)} skipped, reasons in {cache / 'skipped.txt'})")
    log(f"{len(index)} examples ready in {cache} ({len(bad)} skipped)")
    return path, bad


# ------------------------------------------------------------------------------------------------ rows


@dataclass
class Rows:
    """One example as backbone rows: tokens, mask (S, 33), labels (S, 32) (IGNORE where no target), and
    eos (S,) bool marking end-of-audio rows."""

    tokens: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    eos: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def example_rows(tokenizer: Tokenizer, turns: list[Segment], context_loss: bool = True) -> Rows:
    ts, ms, ls, es = [], [], [], []
    for i, seg in enumerate(turns):
        t, m = segment_rows(tokenizer, seg)
        audio = m[:, :NUM_CODEBOOKS].any(-1)
        labelled = audio if (context_loss or i == len(turns) - 1) else np.zeros_like(audio)
        ls.append(np.where(labelled[:, None], t[:, :NUM_CODEBOOKS], IGNORE).astype(np.int32))
        eos = np.zeros(len(t), bool)
        if audio.any():
            eos[-1] = True
        ts.append(t), ms.append(m), es.append(eos)
    return Rows(np.concatenate(ts), np.concatenate(ms), np.concatenate(ls), np.concatenate(es))


def load_index(cache_dir, tokenizer: Tokenizer, context_loss: bool = True) -> tuple[list[str], list[Rows]]:
    """The cached examples as rows. -> (names, rows)."""
    cache = Path(cache_dir)
    path = cache / "index.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: build the cache first (build_cache)")
    names, rows = [], []
    for line in path.read_text().splitlines():
        e = json.loads(line)
        turns = [Segment(t["speaker"], t["text"], codes=np.load(cache / "codes" / t["codes"]).astype(np.int32))
                 for t in e["turns"]]
        names.append(e["name"])
        rows.append(example_rows(tokenizer, turns, context_loss))
    return names, rows


def split_eval(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, eval): a seeded random `eval_fraction` held out (at least one when > 0 and n > 1)."""
    order = np.random.default_rng(seed).permutation(n)
    k = 0 if eval_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * eval_fraction)))
    return np.sort(order[k:]), np.sort(order[:k])


# ---------------------------------------------------------------------------------------------- batches


def bucket_length(n: int) -> int:
    """Padded sequence length: powers of two up to 128, then multiples of 128 (little padding, few shapes)."""
    if n <= 128:
        return max(16, 1 << (n - 1).bit_length())
    return -(-n // 128) * 128


def depth_capacity(batch_size: int, length: int, ratio: float, max_turns: int) -> int:
    """The static number of depth-decoder frames of a (batch_size, length) batch: enough for
    ceil(ratio * frames) frames plus every end-of-audio row, a multiple of 8."""
    frames = min(batch_size * length, math.ceil(ratio * batch_size * length) + batch_size * max_turns)
    return -(-frames // 8) * 8


def choose_depth_frames(labels: np.ndarray, eos: np.ndarray, ratio: float, rng: np.random.Generator, capacity: int):
    """transformers' processor rule (`depth_decoder_labels_ratio`): of the n labelled audio frames,
    floor(n (1 - ratio)) chosen at random are left out, the rest and every labelled end-of-audio row train
    the depth decoder. -> depth_rows (F, 2) int32 (batch row, position), depth_valid (F,) bool, F = capacity."""
    labelled = labels[..., 0] != IGNORE
    frames = np.argwhere(labelled & ~eos)
    ends = np.argwhere(labelled & eos)
    n = len(frames)
    skip = int(n * (1 - ratio)) if ratio <= 1 else 0
    keep = np.sort(rng.permutation(n)[skip:]) if n else np.zeros(0, int)
    chosen = np.concatenate([frames[keep], ends]).astype(np.int32)
    if len(chosen) > capacity:
        raise ValueError(f"{len(chosen)} depth-decoder frames do not fit the capacity {capacity} (bug in "
                         "depth_capacity)")
    rows = np.zeros((capacity, 2), np.int32)
    rows[:len(chosen)] = chosen
    return rows, np.arange(capacity) < len(chosen)


def collate(items: list[Rows], batch_size: int, ratio: float, rng: np.random.Generator, max_turns: int) -> dict:
    """Pads `items` (at most batch_size; missing ones are empty rows) into one batch of numpy arrays."""
    S = bucket_length(max(len(r) for r in items))
    tokens = np.zeros((batch_size, S, NUM_CODEBOOKS + 1), np.int32)
    mask = np.zeros((batch_size, S, NUM_CODEBOOKS + 1), bool)
    labels = np.full((batch_size, S, NUM_CODEBOOKS), IGNORE, np.int32)
    eos = np.zeros((batch_size, S), bool)
    for b, r in enumerate(items):
        n = len(r)
        tokens[b, :n], mask[b, :n], labels[b, :n], eos[b, :n] = r.tokens, r.mask, r.labels, r.eos
    depth_rows, depth_valid = choose_depth_frames(labels, eos, ratio, rng, depth_capacity(batch_size, S, ratio,
                                                                                          max_turns))
    return {"tokens": tokens, "mask": mask, "labels": labels, "depth_rows": depth_rows, "depth_valid": depth_valid}


class Batches:
    """Length-bucketed batches in an order fixed by (seed, epoch): each epoch shuffles the examples, sorts
    them by length within windows of 50 batches (so a batch holds similar lengths), and shuffles the
    batches. Batch i of epoch e, its depth-frame draw included, depends only on (seed, e, i): a run resumed
    at (e, i) sees exactly what the uninterrupted run saw."""

    def __init__(self, rows: list[Rows], batch_size: int, ratio: float, seed: int, max_turns: int):
        if not rows:
            raise ValueError("no training examples")
        self.rows, self.batch_size, self.ratio, self.seed, self.max_turns = rows, batch_size, ratio, seed, max_turns

    def epoch_order(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.rows))
        window = 50 * self.batch_size
        batches = []
        for w in range(0, len(order), window):
            part = sorted(order[w:w + window], key=lambda i: len(self.rows[i]))
            batches += [part[j:j + self.batch_size] for j in range(0, len(part), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def batch(self, epoch: int, index: int, order=None) -> dict:
        order = order if order is not None else self.epoch_order(epoch)
        rng = np.random.default_rng([self.seed, epoch, index, 1])
        return collate([self.rows[i] for i in order[index]], self.batch_size, self.ratio, rng, self.max_turns)

    def iterate(self, epoch: int = 0, index: int = 0):
        """Yields (epoch, index, batch) forever from position (epoch, index)."""
        while True:
            order = self.epoch_order(epoch)
            while index < len(order):
                yield epoch, index, self.batch(epoch, index, order)
                index += 1
            epoch, index = epoch + 1, 0


def eval_batches(rows: list[Rows], batch_size: int, max_turns: int):
    """The held-out examples in fixed batches, every frame trains the depth decoder (ratio 1)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for j in range(0, len(order), batch_size):
        yield collate([rows[i] for i in order[j:j + batch_size]], batch_size, 1.0, np.random.default_rng(0),
                      max_turns)


def max_turns(rows: list[Rows]) -> int:
    return max(int(r.eos.sum()) for r in rows)
