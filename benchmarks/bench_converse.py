"""Conversation latency per stage, and what keeping the context in the KV cache saves.

  transformers serve MODEL --port 8090 &                  # or Ollama, llama.cpp's server, vLLM...
  python benchmarks/bench_converse.py --llm-url http://127.0.0.1:8090/v1 --llm-model MODEL \\
      --asr-model tiny.en --size csm-1b --turns 4 --reference

User turns are spoken by espeak-ng (or given with --input WAV ...) and run through the real pipeline:
silero-vad end of turn, faster-whisper, the LLM's streamed reply cut into sentences, CSM speaking each one
in the conversation's context (random weights at --size, or --checkpoint). Per turn it prints the latency
of each stage from the end of the user's turn (asr, context: the user turn Mimi-encoded and appended to the
cache, first LLM sentence, first audio byte, total) and the context rows; then p50 and p95 per stage.
"append" is the context stage alone: Mimi-encoding the user's audio and appending its rows.

What the cache saves: after each turn it times a from-scratch prefill of the whole history (what Sesame's
generator does before every utterance) with our code, and with --reference the same number of rows through
transformers' CSM backbone (fp32, same config, same run), and prints them beside the append.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

from csm_jax.engine import FRAMES_PER_CALL


TURNS = ["Hello! Can you hear me well today?", "What is the weather usually like on Mars?",
         "That sounds cold. Could people live there one day?", "Tell me one more fun fact, please.",
         "Thanks, that was interesting. Goodbye!"]


@dataclasses.dataclass
class Args:
    llm_url: str = "http://127.0.0.1:8090/v1"
    llm_model: str = "model"
    asr_model: str = "tiny.en"
    """faster-whisper model name or local folder."""
    size: str = "tiny"
    """Random CSM weights: csm-1b (full size) or tiny."""
    checkpoint: Optional[str] = None
    """A real CSM checkpoint instead of random weights."""
    turns: int = 4
    input: tuple[Path, ...] = ()
    """WAV files for the user turns (default: espeak-ng speaks canned turns)."""
    max_sentence_ms: int = 2000
    frames_per_call: int = FRAMES_PER_CALL
    reference: bool = False
    """Also time transformers' CSM backbone over the whole history (the reference's per-turn prefill)."""
    tokenizer: Optional[str] = None
    """Llama-3 tokenizer.json (default: the one scripts/test.sh fetches)."""


def build_generator(args: Args):
    from csm_jax.generate import Generator

    if args.checkpoint:
        return Generator(args.checkpoint, frames_per_call=args.frames_per_call)
    import jax

    from csm_jax import csm
    from csm_jax.mimi import mimi_params_from_tensors
    from csm_jax.testing.inputs import tokenizer_file
    from csm_jax.testing.random_mimi import build_moshi_mimi, moshi_to_hf_tensors

    cfg = csm.CsmConfig.csm_1b() if args.size == "csm-1b" else csm.CsmConfig.tiny()
    params = csm.init_params(cfg, jax.random.key(0))
    moshi = build_moshi_mimi(seed=0)
    _, mimi = mimi_params_from_tensors(moshi_to_hf_tensors({k: v.numpy() for k, v in moshi.state_dict().items()}),
                                       "random Mimi")
    return Generator.from_parts(cfg, params, mimi, tokenizer_file(args.tokenizer), args.frames_per_call)


def turn_files(args: Args, tmp: Path) -> list[Path]:
    if args.input:
        return list(args.input)
    if shutil.which("espeak-ng") is None:
        sys.exit("espeak-ng is not installed: give --input WAV files or apt-get install espeak-ng")
    files = []
    for i in range(args.turns):
        files.append(tmp / f"turn{i + 1}.wav")
        subprocess.run(["espeak-ng", "-w", str(files[-1]), TURNS[i % len(TURNS)]], check=True)
    return files


def time_reprefill(gen, d) -> float:
    """Our from-scratch prefill of everything the dialogue holds (Sesame's per-utterance way)."""
    from csm_jax import csm
    from csm_jax.text import segment_rows

    model = gen.model
    parts = [segment_rows(model.tokenizer, s) for s in d.segments]
    tokens, mask = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    pieces = list(csm.prefill_pieces(tokens[None], mask[None], [len(tokens)]))  # as the engine does

    def run():
        st = csm.GenState.create(model.cfg, 1, model.params["text_embed"].dtype)
        for t, m, n in pieces:
            st = csm.prefill(model.params, model.cfg, st, t, m, n)
        st.h.block_until_ready()

    run()  # compile
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def reference_backbone(args: Args):
    import torch

    from csm_jax.testing.tiny_csm import tiny_hf_config

    torch.set_grad_enabled(False)
    from transformers import CsmConfig as HFCsmConfig
    from transformers.models.csm.modeling_csm import CsmBackboneModel

    if args.size == "csm-1b":
        cfg = HFCsmConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=64, max_position_embeddings=2048)
    else:
        cfg = tiny_hf_config()
    model = CsmBackboneModel(cfg).eval()

    def run(n_rows: int) -> float:
        x = torch.randn(1, n_rows, cfg.hidden_size)
        model(inputs_embeds=x)
        t0 = time.perf_counter()
        model(inputs_embeds=x)
        return time.perf_counter() - t0

    return run


def pct(values, q):
    return float(np.percentile(values, q)) if values else None


def main(args: Args) -> None:
    import soundfile as sf

    from csm_jax.converse import ChatClient, Conversation, Transcriber, TurnDetector, VoiceActivity
    from csm_jax.dialogue import Dialogue

    gen = build_generator(args)
    ref = reference_backbone(args) if args.reference else None
    driver = gen.driver(1).start_thread()  # the conversation's slot, stepped by the driver's thread
    conv = Conversation(Dialogue(driver), ChatClient(args.llm_url, args.llm_model), Transcriber(args.asr_model),
                        max_sentence_ms=args.max_sentence_ms)
    stages = ["asr_s", "context_s", "llm_first_sentence_s", "first_audio_s", "total_s"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in turn_files(args, Path(tmp)):
            audio, sr = sf.read(str(path), dtype="float32")
            audio = np.concatenate([audio, np.zeros(sr, np.float32)])  # a second of silence ends the turn
            det = TurnDetector(VoiceActivity(), sr)
            ends = []
            for i in range(0, audio.size, sr // 10):
                ends += [(e.audio, time.monotonic()) for e in det.feed(audio[i:i + sr // 10]) if e.kind == "turn_end"]
            for turn_audio, t_end in ends:
                log = conv.turn(turn_audio, sr, t_end=t_end)
                if log is None:
                    continue
                row = {"turn": log.turn, "rows_before": log.context_rows_before, "rows": log.context_rows,
                       "audio_s": log.audio_seconds, **{k: log.latency.get(k) for k in stages},
                       "append_s": round(log.latency["context_s"] - log.latency["asr_s"], 4),
                       "reprefill_s": time_reprefill(gen, conv.dialogue),
                       "reference_reprefill_s": ref(conv.dialogue.rows) if ref else None, "error": log.error}
                rows.append(row)
                print(f"turn {row['turn']}: {log.user_text!r} -> {log.reply_text[:60]!r}", file=sys.stderr)
    print(f"{'turn':>4s} {'rows':>10s} " + " ".join(f"{s[:-2]:>18s}" for s in stages) +
          f" {'append':>8s} {'re-prefill ours':>16s} {'re-prefill ref':>15s}")
    for r in rows:
        fmt = lambda v: f"{v:18.3f}" if v is not None else f"{'-':>18s}"  # noqa: E731
        print(f"{r['turn']:4d} {r['rows_before']:>4d}->{r['rows']:<5d} " + " ".join(fmt(r[s]) for s in stages) +
              f" {r['append_s']:8.3f} {r['reprefill_s']:16.3f} " + (f"{r['reference_reprefill_s']:15.3f}" if ref else f"{'-':>15s}"))
    summary = {s: {"p50": pct([r[s] for r in rows if r[s] is not None], 50),
                   "p95": pct([r[s] for r in rows if r[s] is not None], 95)} for s in stages}
    for s, v in summary.items():
        if v["p50"] is not None:
            print(f"{s[:-2]:>22s}: p50 {v['p50']:.3f} s, p95 {v['p95']:.3f} s")
    print(json.dumps({"size": args.checkpoint or args.size, "turns": rows, "summary": summary}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
