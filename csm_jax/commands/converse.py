"""Talk with CSM: your speech -> silero-vad -> faster-whisper -> any OpenAI-compatible LLM -> CSM's voice.

From the microphone (speaker out; headphones keep the reply out of the microphone):
  python scripts/converse.py --llm-url http://localhost:11434/v1 --llm-model llama3.2

Headless, from audio files (each file is one or more user turns; replies and a transcript are written):
  python scripts/converse.py --input turn1.wav --input turn2.wav --out-dir replies/
  python scripts/converse.py --input my_turns/ --out-dir replies/          (a folder: its audio files, sorted)

The out-dir gets reply_001.wav, reply_002.wav, ... and transcript.jsonl with one JSON line per turn: user
text, reply text, audio seconds, the CSM context rows used, the context itself (speaker, text, frames and
a fingerprint of each segment's codes) and the latency of each stage in seconds from the end of the
user's turn (asr_s; context_s: the turn is in CSM's cache; llm_first_sentence_s; first_audio_s; total_s).
Each user turn (its audio and words) and each reply stay in CSM's context, so the voice follows the conversation; --voice pins a voice prompt.
Speaking during a reply (microphone mode) interrupts it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import tyro

from csm_jax.audio import check_output_folder
from csm_jax.converse import ConverseOptions
from csm_jax.engine import FRAMES_PER_CALL

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".opus"}


@dataclasses.dataclass
class Args(ConverseOptions):
    input: Annotated[tuple[Path, ...], tyro.conf.UseAppendAction] = ()
    """Audio file (or folder of them) to run headless; repeat for more; none: use the microphone."""
    out_dir: Path = Path("conversation")
    """Where headless mode writes reply_NNN.wav and transcript.jsonl."""
    checkpoint: str = "sesame/csm-1b"
    """CSM checkpoint: hub id or local folder."""
    mimi: Optional[str] = None
    """Mimi checkpoint when the CSM checkpoint has none inside."""
    tokenizer: Optional[Path] = None
    """Llama-3 tokenizer.json when the checkpoint has none."""
    frames_per_call: int = FRAMES_PER_CALL
    """Frames generated per device call (smaller: earlier first audio)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """CSM's compute dtype, whatever the file stores; auto = float32 on CPU (bf16 matmuls are slow there),
    bfloat16 on GPU/TPU. Mimi decodes in float32."""
    quantize: Literal["none", "int8"] = "none"
    """int8: weight-only int8 (per-channel scales, computed at load) for the large matmul weights: half the bytes of
    bf16 per frame; codes differ a little from the unquantized model's (see benchmarks/README.md)."""
    input_device: Optional[str] = None
    """Microphone mode: sounddevice input device (name or index); default device otherwise."""
    output_device: Optional[str] = None


def input_files(paths) -> list[Path]:
    files = []
    for p in paths:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"no audio files in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return files


def stage_line(log) -> str:
    lat = log.latency
    parts = [f"{k[:-2]} {lat[k]:.2f}s" for k in ("asr_s", "context_s", "llm_first_sentence_s", "first_audio_s",
                                                              "total_s") if k in lat]
    return (f"turn {log.turn}: context {log.context_rows_before}->{log.context_rows} rows"
            f"{' (rebuilt)' if log.rebuilt else ''} | " + " | ".join(parts))


def headless(args: Args, gen) -> None:
    import numpy as np
    import soundfile as sf

    from csm_jax.audio import to_mono, write_audio

    files = input_files(args.input)
    check_output_folder(args.out_dir)  # its parent must exist; the folder itself is made
    driver = gen.driver(1).start_thread()  # one conversation: one engine slot, stepped by the driver's thread
    make = args.factory(driver)
    args.out_dir.mkdir(exist_ok=True)  # once the parts have loaded: a start that fails leaves no folder
    conv, detector = None, None
    transcript = args.out_dir / "transcript.jsonl"
    n_replies = 0
    with open(transcript, "w", encoding="utf-8") as out:
        for path in files:
            try:
                samples, sr = sf.read(str(path), dtype="float32", always_2d=True)
            except Exception as e:  # noqa: BLE001 - libsndfile's own message says what is wrong
                raise ValueError(f"cannot read {path}: {e}") from e
            audio = to_mono(samples, sr, sr, what=str(path))
            if conv is None:
                conv, detector = make(sr)
            elif detector.sr != sr:
                detector = args.detector(sr)
            detector.reset()
            turns = []
            step = max(sr // 10, 1)  # 100 ms chunks, as a microphone delivers them
            for i in range(0, audio.size, step):
                for ev in detector.feed(audio[i:i + step]):
                    if ev.kind == "turn_end":
                        turns.append((ev.audio, time.monotonic()))
            rest = detector.flush()
            if rest is not None:
                turns.append((rest, time.monotonic()))
            if not turns:
                print(f"{path}: no speech found", file=sys.stderr)
            for turn_audio, t_end in turns:
                chunks = []
                log = conv.turn(turn_audio, sr, chunks.append, t_end=t_end)
                if log is None:
                    print(f"{path}: no words recognized; no turn", file=sys.stderr)
                    continue
                if chunks:
                    n_replies += 1
                    write_audio(args.out_dir / f"reply_{log.turn:03d}.wav", np.concatenate(chunks))
                out.write(log.to_json() + "\n")
                out.flush()
                print(f"you: {log.user_text}\ncsm: {log.reply_text}\n{stage_line(log)}", file=sys.stderr)
                if log.error:
                    print(f"error: {log.error}", file=sys.stderr)
    print(f"{n_replies} replies and {transcript} written", file=sys.stderr)


def microphone(args: Args, gen) -> None:
    import queue
    import threading

    import numpy as np

    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:
        raise ImportError(f"microphone mode needs sounddevice and PortAudio ({e}); "
                          "or run headless with --input FILES") from e
    from csm_jax.converse import LiveSession

    sr = 16_000
    conv, detector = args.factory(gen.driver(1).start_thread())(sr)
    playback: queue.Queue = queue.Queue()
    state = {"buf": np.zeros(0, np.float32)}

    def emit(kind, value):
        if kind == "audio":
            playback.put(value)
        elif kind == "barge_in":
            while not playback.empty():
                playback.get_nowait()
            state["buf"] = np.zeros(0, np.float32)
            print("(interrupted)", file=sys.stderr)
        elif kind in ("user", "reply"):
            print(f"{'you' if kind == 'user' else 'csm'}: {value}", file=sys.stderr)
        elif kind == "turn":
            print(stage_line(value), file=sys.stderr)
        elif kind == "no_words":
            print("(no words heard)", file=sys.stderr)
        elif kind == "error":
            print(f"error: {value}", file=sys.stderr)

    def play(outdata, frames, _time, _status):
        buf = state["buf"]
        while buf.size < frames and not playback.empty():
            buf = np.concatenate([buf, playback.get_nowait()])
        n = min(frames, buf.size)
        outdata[:n, 0], outdata[n:, 0] = buf[:n], 0
        state["buf"] = buf[n:]

    # At most 60 s of microphone audio waits for the turn detector; more is dropped (with one warning) rather
    # than hoarded: a real microphone never gets there, a device without a clock (a file, ALSA's null) does.
    mic: queue.Queue = queue.Queue(maxsize=600)
    overflow = threading.Event()

    def record(x, *_):
        try:
            mic.put_nowait(x[:, 0].copy())
        except queue.Full:
            overflow.set()

    dev_in = int(args.input_device) if args.input_device and args.input_device.isdigit() else args.input_device
    dev_out = int(args.output_device) if args.output_device and args.output_device.isdigit() else args.output_device
    try:
        streams = (sd.InputStream(sr, channels=1, dtype="float32", blocksize=sr // 10, device=dev_in,
                                  callback=record),
                   sd.OutputStream(24_000, channels=1, dtype="float32", device=dev_out, callback=play))
    except (sd.PortAudioError, ValueError) as e:
        raise ValueError(f"no usable microphone or speaker ({e}); pick devices with --input-device / "
                         "--output-device (python -m sounddevice lists them), or run headless with --input FILES") from e
    session = LiveSession(conv, detector, emit)
    with streams[0], streams[1]:
        print("listening: speak, pause to let CSM answer (Ctrl-C quits)", file=sys.stderr)
        try:
            warned = False
            while True:
                session.feed(mic.get())
                if overflow.is_set() and not warned:
                    warned = True
                    print("warning: the microphone delivers audio faster than real time; dropping what cannot be "
                          "processed", file=sys.stderr)
        except KeyboardInterrupt:
            pass
        finally:
            session.close()


def main(args: Args) -> None:
    from csm_jax.generate import Generator

    args.check()  # cheap checks first, before loading models
    if args.input:
        input_files(args.input)
        check_output_folder(args.out_dir)
        if args.out_dir.exists() and not args.out_dir.is_dir():
            raise ValueError(f"--out-dir {args.out_dir} is a file: give a folder (it is created if missing)")
    args.voice_segments()
    gen = Generator(args.checkpoint, mimi=args.mimi, tokenizer=str(args.tokenizer) if args.tokenizer else None,
                    dtype=args.dtype, frames_per_call=args.frames_per_call,
                    quantize=args.quantize)
    (headless if args.input else microphone)(args, gen)

