"""A batch job's manifest: which utterances of a folder's job are written, so that a rerun continues the job.

The manifest is JSON Lines in the output folder. Its first line describes the job: the settings that decide
the audio (named as their flags), the number of utterances and a SHA-256 of their texts:
  {"job": {"checkpoint": "sesame/csm-1b", "seed": 0, "temperature": 0.9, ...}, "utterances": 3, "texts_sha256": "..."}
Each later line is one utterance written, appended only once its file is complete (files are written to a
temporary name, synced and renamed; the line is synced too):
  {"index": 0, "text": "Hello there.", "file": "000.wav", "audio_s": 1.92, "seed": 0}
`index` is the utterance's number (its file's name; blank lines of a text file are not counted), `file` is
relative to the folder, `seed` the seed of its first sentence. An utterance counts as written when its line
is there and its file exists, so a job killed at any moment and run again speaks only what is missing (one
utterance at most twice: the one whose file was renamed into place but whose line was not yet appended, and
the second time gives the same audio). A line cut short by a crash is dropped.

Several processes (csm_jax.distributed) each append to a manifest of their own: manifest.jsonl for a single
process, manifest.processP.jsonl for process P of several: appends from several hosts to one file on a shared
filesystem (NFS) can interleave or get lost, appends to a file of one's own need no coordination. Every
process reads all of them, so a rerun with another number of processes still knows everything written.
A rerun whose texts or settings differ from the manifest's is refused (ValueError) with what differs: a job
is never continued with other settings into a mix of two.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SINGLE = "manifest.jsonl"


def file_name(process: int, processes: int) -> str:
    """The manifest file of process `process` of `processes`."""
    return SINGLE if processes == 1 else f"manifest.process{process}.jsonl"


def texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


class Manifest:
    """The manifest of process `process` of `processes` in `folder`, opened for appending; `done` maps the index
    of every utterance already written, by any process of any earlier run, to its line."""

    def __init__(self, folder: Path, job: dict, texts: list[str], process: int = 0, processes: int = 1,
                 also: tuple[str, ...] = ()):
        """`job`: the settings that decide the audio, keyed by their flags' names; `also`: suffixes of files
        written beside each utterance's own (e.g. ".npy"), which must exist too for it to count as written."""
        self.folder, self.texts = Path(folder), texts
        self.path = self.folder / file_name(process, processes)
        header = {"job": job, "utterances": len(texts), "texts_sha256": texts_sha256(texts)}
        created = not self.path.exists()
        self._fd = _open_locked(self.path)
        try:
            entries = []
            for path in sorted(self.folder.glob("manifest*.jsonl")):
                if path.name != SINGLE and not path.name.startswith("manifest.process"):
                    continue
                data = path.read_bytes()
                first, lines = _read(path, data)
                if first is not None:
                    _check(path, first, header, texts, lines)
                entries += lines
                if path == self.path and not data.endswith(b"\n"):
                    os.ftruncate(self._fd, data.rfind(b"\n") + 1)  # a line cut short: the rest appends after it
        except BaseException:
            self.close()
            if created and self.path.stat().st_size == 0:
                self.path.unlink()
            raise
        self.done: dict[int, dict] = {}
        for e in entries:
            files = [self.folder / e["file"]] + [(self.folder / e["file"]).with_suffix(s) for s in also]
            if all(f.is_file() for f in files):
                self.done[e["index"]] = e
        if os.fstat(self._fd).st_size == 0:
            self._append(header)

    def add(self, index: int, file: str, audio_s: float, seed: int) -> None:
        """Records utterance `index` as written (its file, relative to the folder, is complete)."""
        self._append({"index": index, "text": self.texts[index], "file": file, "audio_s": round(audio_s, 3),
                      "seed": seed})

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        while line:  # one write call, in practice: a line is whole or (killed before the call) absent
            line = line[os.write(self._fd, line):]
        os.fsync(self._fd)


def _read(path: Path, data: bytes) -> tuple[dict | None, list[dict]]:
    """(the job line or None, the utterance lines) of the manifest `data` read from `path`. A last line without
    its newline is an append cut short (or, from another process, still under way): it is left out."""
    records = []
    for n, line in enumerate(data.split(b"\n")[:-1], 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path} line {n} is not a manifest line ({line[:80]!r}); it was written by something "
                             f"else, or damaged: move it away to start the job in {path.parent} over") from None
    if not records:
        return None, []
    first, lines = records[0], records[1:]
    if not isinstance(first, dict) or "job" not in first or not all(
            isinstance(e, dict) and {"index", "text", "file"} <= e.keys() for e in lines):
        raise ValueError(f"{path} is not a manifest of csm-jax's synthesize; move it away to start the job in "
                         f"{path.parent} over")
    return first, lines


def _check(path: Path, first: dict, header: dict, texts: list[str], lines: list[dict]) -> None:
    """Raises ValueError, saying what differs, unless the manifest at `path` is of the job `header`."""
    folder = path.parent
    how = (f"To finish that job, run it again with its own texts and settings; to run this one, give another "
           f"--out-dir (or move {folder / 'manifest*.jsonl'} away to start over in {folder}, writing its files again)")
    old = first["job"]
    diffs = [_difference(k, old.get(k), v) for k, v in header["job"].items() if old.get(k) != v]
    diffs += [_difference(k, v, None) for k, v in old.items() if k not in header["job"]]
    if diffs:
        raise ValueError(f"{folder} holds a job with other settings ({path.name}): {'; '.join(diffs)}. {how}")
    if first.get("texts_sha256") == header["texts_sha256"]:
        return
    what = next((f"utterance {e['index']} ({e['file']}) was {e['text']!r}, now "
                 f"{texts[e['index']] if e['index'] < len(texts) else None!r}" for e in lines
                 if e["index"] >= len(texts) or texts[e["index"]] != e["text"]), None)
    if what is None and first.get("utterances") != len(texts):
        what = f"it had {first.get('utterances')} utterances, now {len(texts)}"
    raise ValueError(f"the texts differ from those of the job in {folder} ({path.name}): "
                     f"{what or 'an utterance not yet written changed'}. {how}")


def _difference(key: str, old, new) -> str:
    flag = "--" + key.replace("_", "-")
    if len(repr(old)) + len(repr(new)) > 120:
        return f"{flag} differs"
    return f"{flag} was {old!r}, now {new!r}"


def _open_locked(path: Path) -> int:
    """A descriptor appending to `path` (created if missing), locked against a second writer."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another process is writing {path}: the same job is running already (a second run into "
                         f"{path.parent} would speak its utterances twice); wait for it or stop it") from None
    except OSError:
        pass  # a filesystem without locks (some NFS setups): one run at a time is then up to the user
    return fd
