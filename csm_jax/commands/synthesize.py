"""Text to speech with CSM-1B: one WAV (24 kHz) per utterance.

  python scripts/synthesize.py --text "Hello from CSM." --out hello.wav
  python scripts/synthesize.py --text-file lines.txt --out-dir out/ --batch-size 8 --speaker 1
  python scripts/synthesize.py --text "Nice to meet you." --context me.wav "Hi, I'm Sam." 0 --speaker 0 --out a.wav

Each utterance is split into sentences, generated in order, each with the earlier sentences' audio as
context (appended to the utterance's KV cache, never prefilled again; the oldest sentences leave when the
2048-row budget is reached), so a paragraph keeps one voice.
Utterances are generated `--batch-size` at a time, split evenly over all local devices (`--devices`).
`--context AUDIO TRANSCRIPT SPEAKER` (repeatable) puts earlier turns before every utterance: voice prompting.
Outputs are written only when complete (no partial files). If decoding or writing fails after generation,
the utterances' Mimi codes are saved as .npy beside the intended WAVs (decode them later with
scripts/codec.py) and the script exits with status 1 and a one-line error naming them.
A --text-file job is resumable: the out-dir's manifest.jsonl gets one JSON line per utterance written (index,
text, file, audio seconds, seed; csm_jax/manifest.py), and the same command run again, after a crash or a
kill at any moment, speaks only the utterances not written yet. Other texts or settings than the manifest's
are refused (give another --out-dir).
Several hosts: start the same command on each, one process per host, with JAX's distributed environment
(JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; or under Slurm or Open MPI; or
CSM_JAX_DISTRIBUTED=1 on a TPU slice; see csm_jax/distributed.py). Process p speaks the utterances i with
i % processes == p on its own devices and writes them under their usual names (each exactly once, in its
own --out-dir: share one folder between hosts to get them all in one place; each process keeps its own
manifest there, manifest.processP.jsonl); process 0 prints a summary when all are done. If one process
fails, the others finish their share and then exit with status 1.
The default checkpoint, sesame/csm-1b, is gated on the hub: accept its license and run
`huggingface-cli login` first. Checkpoints stored in fp32, bf16 or fp16 all load; --dtype picks the compute
dtype. Offline (HF_HUB_OFFLINE=1), give a local folder and, for Sesame's layout, --mimi.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro

from csm_jax.engine import FRAMES_PER_CALL


@dataclasses.dataclass
class Args:
    text: Annotated[list[str], tyro.conf.UseAppendAction] = dataclasses.field(default_factory=list)
    """Text to speak (repeat the flag for several utterances)."""
    text_file: Optional[Path] = None
    """A file with one utterance per line (blank lines skipped); a rerun into the same --out-dir continues the
    job (see above)."""
    speaker: int = 0
    """Speaker id, as CSM writes it: [0], [1], ..."""
    context: Annotated[list[tuple[Path, str, int]], tyro.conf.UseAppendAction] = dataclasses.field(
        default_factory=list)
    """AUDIO TRANSCRIPT SPEAKER of an earlier turn (repeatable); any format and sample rate."""
    out: Optional[Path] = None
    """Output WAV for a single utterance."""
    out_dir: Optional[Path] = None
    """Output folder for several utterances (000.wav, 001.wav, ...)."""
    batch_size: int = 4
    """Utterances generated at once (by each process of a multi-host run); on several devices rounded up to a
    multiple of their number, so each device gets as many."""
    devices: int = 0
    """Local devices to generate on (the first N of jax.local_devices()); 0: all of them. On several devices
    each batch's utterances are split evenly over them (data parallel, csm_jax.sharding); every utterance gets
    the codes it would get on one device."""
    seed: int = 0
    """Random seed; sentence r of utterance i uses seed + 1000 i + r. The same seed gives the same audio."""
    temperature: float = 0.9
    """Sampling temperature; 0 = greedy."""
    topk: int = 50
    """Top-k sampling: 1 to 2048 (all of the codebook)."""
    max_audio_ms: int = 10_000
    """Longest audio per sentence, in milliseconds (80 ms per frame)."""
    checkpoint: str = "sesame/csm-1b"
    """Hub repo id or local folder (Sesame's or transformers' layout; weights in fp32, bf16 or fp16)."""
    mimi: Optional[str] = None
    """Mimi checkpoint (hub id, folder or .safetensors file) when the CSM checkpoint has none inside
    (Sesame's layout); default kyutai/mimi from the hub."""
    tokenizer: Optional[Path] = None
    """Llama-3 tokenizer.json when the checkpoint has none."""
    save_codes: bool = False
    """Also write the Mimi codes of each utterance as .npy (32, frames) next to its WAV."""
    frames_per_call: int = FRAMES_PER_CALL
    """Frames generated per device call."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """CSM's compute dtype, whatever the file stores; auto = float32 on CPU (bf16 matmuls are slow there),
    bfloat16 on GPU/TPU. Mimi decodes in float32."""
    quantize: Literal["none", "int8"] = "none"
    """int8: weight-only int8 (per-channel scales, computed at load) for the large matmul weights: half the bytes of
    bf16 per frame; codes differ a little from the unquantized model's (see benchmarks/README.md)."""


def _plan(args: Args) -> tuple[list[str], list[Path]]:
    """Validates everything that can be checked before loading the model; returns texts and output paths."""
    from csm_jax.audio import check_output_folder
    from csm_jax.request import MAX_SEED, check_temperature, check_topk
    from csm_jax.text import check_speaker, check_text, split_sentences

    texts = list(args.text)
    if args.text_file is not None:
        texts += _read_lines(args.text_file)
    if not texts:
        raise ValueError("nothing to say: give --text or --text-file")
    texts = [check_text(t) for t in texts]
    sentences = [len(split_sentences(t)) for t in texts]  # a text with no words fails here, before the model loads
    check_speaker(args.speaker)
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.devices < 0:
        raise ValueError("--devices must be 0 (all local devices) or a count of them")
    if args.max_audio_ms < 80:
        raise ValueError("--max-audio-ms must be at least 80 (one frame)")
    if args.frames_per_call < 1:
        raise ValueError(f"--frames-per-call {args.frames_per_call}: give at least 1")
    for flag, check, value in (("--temperature", check_temperature, args.temperature),
                               ("--topk", check_topk, args.topk)):
        try:
            check(value)
        except ValueError as e:
            raise ValueError(f"{flag} {value}: {e}") from None
    last = max(1000 * i + n - 1 for i, n in enumerate(sentences))  # sentence r of utterance i: seed + 1000 i + r
    if not 0 <= args.seed <= MAX_SEED - last:
        raise ValueError(f"--seed {args.seed}: give 0 to {MAX_SEED - last} (seeds are 0 .. {MAX_SEED}, and "
                         f"sentence r of utterance i uses seed + 1000 i + r, up to seed + {last} here)")
    if args.out is not None and args.out_dir is not None:
        raise ValueError("give --out or --out-dir, not both")
    for audio, transcript, spk in args.context:
        if not audio.is_file():
            raise FileNotFoundError(f"--context audio not found: {audio}")
        check_text(transcript)
        check_speaker(spk)
    if args.out is not None:
        if len(texts) != 1:
            raise ValueError(f"--out names one file but there are {len(texts)} utterances: use --out-dir")
        outs = [args.out]
    else:
        folder = args.out_dir or Path("out")
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out-dir {folder} is a file, not a folder: give a folder (it is created if missing)")
        if args.text_file is None and any(folder.glob("manifest*.jsonl")):  # --text alone keeps no manifest
            raise ValueError(f"--out-dir {folder} holds a --text-file job (manifest*.jsonl) whose files these "
                             "utterances would overwrite, so that job could no longer resume: give another --out-dir")
        try:
            folder.mkdir(parents=True, exist_ok=True)  # the last check: a refused job creates no folder
        except OSError as e:
            raise ValueError(f"--out-dir {folder} cannot be created ({e.strerror}): give a folder you can write "
                             "in") from None
        outs = [folder / f"{i:03d}.wav" for i in range(len(texts))]
    for o in outs:
        if o.suffix.lower() != ".wav":
            raise ValueError(f"output must be a .wav file, got {o}")
        check_output_folder(o)
    return texts, outs


def _read_lines(path: Path) -> list[str]:
    """The utterances of a --text-file: its lines that are not blank, stripped."""
    if not path.is_file():
        raise FileNotFoundError(f"--text-file not found: {path}" if not path.exists() else
                                f"--text-file {path} is not a file: give a text file, one utterance a line")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--text-file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                         f"{e.start}): save it as UTF-8, one utterance a line") from None
    if not lines:
        raise ValueError(f"--text-file {path} has no text (only blank lines): one utterance a line")
    return lines


def main(args: Args) -> None:
    from csm_jax import audio as audio_io
    from csm_jax import distributed

    distributed.plan()  # a half-described multi-host environment fails here, in one line, before anything runs
    multi = distributed.initialize()
    record = None
    try:
        texts, outs = _plan(args)
        mine = distributed.share(len(texts))  # every line of a multi-host run is spoken by exactly one process
        if args.text_file is not None and args.out is None:  # a batch job: resumable
            record = _manifest(args, texts, outs[0].parent)
            todo = [i for i in mine if i not in record.done]
            for i in todo:  # a kill while writing leaves a temporary file
                audio_io.remove_unfinished(outs[i])
                audio_io.remove_unfinished(outs[i].with_suffix(".npy"))
            if len(todo) < len(mine):
                print(f"{record.folder}: {len(mine) - len(todo)} of {len(mine)} utterances{_of_this_process()} "
                      f"are written already (manifest*.jsonl); {len(todo)} to go", file=sys.stderr)
        else:
            todo = mine
        made = _speak(args, texts, outs, todo, record) if todo else []
    except BaseException as e:
        if not isinstance(e, SystemExit):
            distributed.report_failure(f"{type(e).__name__}: {e}")
        elif e.code:
            distributed.report_failure(f"exit status {e.code}; its error output says why")
        raise
    finally:
        if record is not None:
            record.close()
    if multi:  # process 0 reports once every process has written its files
        try:
            done = [json.loads(v) for v in distributed.gather(
                "synthesize-done", json.dumps({"written": made, "before": len(mine) - len(todo)}))]
        except (RuntimeError, TimeoutError) as e:  # another process failed: its own error output says why
            sys.exit(f"error: {e}; this process wrote its {len(made)} utterances")
        import jax

        if jax.process_index() == 0:
            written = [d["written"] for d in done]
            n, seconds = sum(map(len, written)), sum(s for w in written for _, s in w)
            before = sum(d["before"] for d in done)
            print(f"{n} utterances ({seconds:.1f} s of audio) written by {len(done)} processes "
                  f"({', '.join(f'process {p}: {len(w)}' for p, w in enumerate(written))})"
                  + (f"; {before} were written before" if before else ""))


def _of_this_process() -> str:
    import jax

    return f" of process {jax.process_index()}" if jax.process_count() > 1 else ""


def _manifest(args: Args, texts: list[str], folder: Path):
    """The manifest of this process in `folder`, checked against the settings that decide the audio."""
    import jax

    from csm_jax.manifest import Manifest

    return Manifest(folder, _job(args), texts, jax.process_index(), jax.process_count(),
                    also=(".npy",) if args.save_codes else ())


def _job(args: Args) -> dict:
    """The settings that decide the audio, as a manifest records them. Not --batch-size, --devices or
    --frames-per-call: an utterance's codes do not depend on them."""
    import hashlib
    import os

    from csm_jax.checkpoints import compute_dtype

    def where(path):  # a local path as the same command spells it again: "ckpt/" and "./ckpt" are "ckpt"
        return None if path is None else os.path.normpath(path) if os.path.exists(path) else str(path)

    return {"checkpoint": where(args.checkpoint), "mimi": where(args.mimi), "tokenizer": where(args.tokenizer),
            "dtype": compute_dtype(args.dtype).name, "quantize": args.quantize, "speaker": args.speaker,
            "context": [{"audio_sha256": hashlib.sha256(a.read_bytes()).hexdigest(), "transcript": tr,
                         "speaker": spk} for a, tr, spk in args.context],
            "seed": args.seed, "temperature": args.temperature, "topk": args.topk,
            "max_audio_ms": args.max_audio_ms, "save_codes": args.save_codes}


def _speak(args: Args, texts: list[str], outs: list[Path], mine: list[int], record) -> list[tuple[int, float]]:
    """Speaks the utterances `mine` (indices into texts) on this process's devices, `--batch-size` at a time,
    and writes each (recording it in the manifest `record`, if any); returns (index, seconds of audio) of each
    one written."""
    import numpy as np
    from tqdm import tqdm

    from csm_jax import audio as audio_io
    from csm_jax.generate import Generator
    from csm_jax.text import Segment

    import jax

    from csm_jax.sharding import device_mesh

    local = jax.local_devices()
    if not 0 <= args.devices <= len(local):
        raise ValueError(f"--devices {args.devices}: this host has {len(local)} local devices; pass 1 to "
                         f"{len(local)}, or 0 for all")
    n = args.devices or len(local)
    context = [Segment(spk, tr, audio=audio_io.load_audio(a)) for a, tr, spk in args.context]
    gen = Generator(args.checkpoint, mimi=args.mimi, tokenizer=str(args.tokenizer) if args.tokenizer else None,
                    dtype=args.dtype, frames_per_call=args.frames_per_call,
                    quantize=args.quantize, mesh=device_mesh(n, devices=local))
    context = gen.model.context_codes(context)  # encode the prompts once
    batch = gen.model.round_slots(args.batch_size)  # a multiple of the devices: each holds as many slots
    where = [f"process {jax.process_index()} of {jax.process_count()}"] if jax.process_count() > 1 else []
    where += [f"{n} devices"] if n > 1 else []
    bar = tqdm(total=len(mine), unit="utt", desc=f"synthesizing ({', '.join(where)})" if where else "synthesizing")
    written = []
    for start in range(0, len(mine), batch):
        idx = mine[start:start + batch]
        # Sentence by sentence, each appended to its utterance's cache (a conversation slot per utterance).
        made = gen.generate_paragraphs([texts[i] for i in idx], args.speaker, context,
                                       seeds=[args.seed + i * 1000 for i in idx], temperature=args.temperature,
                                       topk=args.topk, max_audio_ms=args.max_audio_ms, batch_size=len(idx))
        codes = dict(zip(idx, made))
        for i in idx:
            try:
                wav = gen.model.decode_codes(codes[i])
                if wav.size == 0:
                    tqdm.write(f"warning: utterance {i} ended before any audio (EOS at the first frame); "
                               "writing silence")
                    wav = np.zeros(1920, np.float32)
                if args.save_codes:
                    audio_io.save_npy(outs[i].with_suffix(".npy"), codes[i])
                audio_io.write_audio(outs[i], wav)
                if record is not None:
                    record.add(i, outs[i].name, len(wav) / 24000, args.seed + i * 1000)
            except Exception as e:  # noqa: BLE001 - whatever failed, the generated codes must survive
                bar.close()
                _keep_codes_and_exit(args, gen, [(j, outs[j], codes[j]) for j in idx if j >= i], e)
            tqdm.write(f"{outs[i]}: {len(wav) / 24000:.2f} s")
            written.append((i, len(wav) / 24000))
            bar.update(1)
    bar.close()
    return written


def _keep_codes_and_exit(args: Args, gen, pending, error: Exception) -> None:
    """After generation something failed: save each pending utterance's codes beside its WAV, say so in one
    line, and exit with status 1."""
    import sys

    from csm_jax import audio as audio_io

    saved = []
    for _, out, codes in pending:
        try:
            saved.append(str(audio_io.save_npy(out.with_suffix(".npy"), codes)))
        except Exception:  # noqa: BLE001 - e.g. the folder became unwritable: report what was kept
            pass
    reason = (str(error).strip().splitlines() or [""])[0]
    mimi = args.mimi or (args.checkpoint if gen.model.ckpt is not None and gen.model.ckpt.codec_tensors is not None
                         else "kyutai/mimi")
    first = pending[0][1]
    if saved:
        kept = (f"the generated Mimi codes are saved in {', '.join(saved)}; decode them with "
                f"`python scripts/codec.py decode {saved[0]} {first} --checkpoint {mimi}`")
    else:
        kept = "saving the generated codes failed too"
    print(f"error: utterance {pending[0][0]} was generated, but decoding or writing {first} failed "
          f"({type(error).__name__}: {reason}); {kept}", file=sys.stderr)
    sys.exit(1)

