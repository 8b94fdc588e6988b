"""Mimi speed: csm_jax against transformers' MimiModel and moshi 0.2.2, same random weights, same input, same run.

  python benchmarks/bench_mimi.py [--seconds 10] [--batches 1 8] [--stream-frames 50]

One-shot encode and decode of `seconds` of audio at each batch size, and streaming per-frame latency
(1920-sample chunks in, one frame of codes out; one frame in, 1920 samples out) at batch 1. Prints a table
and one JSON line. Real-time factor (RTF) = compute seconds per second of audio (lower is better).
Needs the test extras (torch, transformers, moshi) for the references.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


@dataclasses.dataclass
class Args:
    seconds: float = 10.0
    """Audio length for the one-shot measurements."""
    batches: tuple[int, ...] = (1, 8)
    """Batch sizes for the one-shot measurements."""
    stream_frames: int = 50
    """Frames timed in the streaming measurements (after warm-up)."""
    repeats: int = 3
    """Timed repeats per one-shot measurement (the best is kept)."""
    threads: int = 0
    """torch threads (0 = torch's default)."""


def best_of(fn, repeats):
    fn()  # warm-up / compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(args: Args) -> None:
    import jax
    import jax.numpy as jnp
    import torch
    from safetensors.numpy import save_file
    from transformers import MimiConfig as HFMimiConfig
    from transformers import MimiModel

    from csm_jax.mimi import decode, decode_step, encode, encode_step, init_decoder_state, init_encoder_state, load_mimi
    from mimi_fixtures import build_moshi_mimi, moshi_to_hf_tensors, save_moshi_layout, speech_like

    if args.threads:
        torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp()
    moshi = build_moshi_mimi(seed=0)
    save_moshi_layout(moshi, os.path.join(tmp, "mimi.safetensors"))
    _, params = load_mimi(os.path.join(tmp, "mimi.safetensors"))
    hf_dir = os.path.join(tmp, "hf")
    os.makedirs(hf_dir)
    save_file(moshi_to_hf_tensors({k: v.numpy() for k, v in moshi.state_dict().items()}),
              os.path.join(hf_dir, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json"), "w") as fh:
        json.dump(HFMimiConfig().to_dict(), fh)
    hf = MimiModel.from_pretrained(hf_dir).eval()

    L = int(args.seconds * 24000) // 1920 * 1920
    rows, result = [], {"machine": f"{jax.default_backend()} ({os.cpu_count()} cpus)", "seconds": L / 24000,
                        "torch_threads": torch.get_num_threads()}
    for B in args.batches:
        x = np.stack([speech_like(L, seed=s) for s in range(B)])
        xj, xt = jnp.asarray(x), torch.from_numpy(x)[:, None]
        codes = np.asarray(encode(params, xj))
        cj, ct = jnp.asarray(codes), torch.from_numpy(codes.astype(np.int64))
        with torch.no_grad():
            t = {
                "encode": {
                    "ours": best_of(lambda: encode(params, xj).block_until_ready(), args.repeats),
                    "transformers": best_of(lambda: hf.encode(xt, num_quantizers=32), args.repeats),
                    "moshi": best_of(lambda: moshi.encode(xt), args.repeats),
                },
                "decode": {
                    "ours": best_of(lambda: decode(params, cj).block_until_ready(), args.repeats),
                    "transformers": best_of(lambda: hf.decode(ct), args.repeats),
                    "moshi": best_of(lambda: moshi.decode(ct), args.repeats),
                },
            }
        audio_s = B * L / 24000
        for op, d in t.items():
            rtf = {k: v / audio_s for k, v in d.items()}
            rows.append((f"{op} B={B}", rtf["ours"], rtf["transformers"], rtf["moshi"]))
            result[f"{op}_b{B}"] = {"rtf": rtf, "speedup_vs_transformers": d["transformers"] / d["ours"],
                                    "speedup_vs_moshi": d["moshi"] / d["ours"]}

    # Streaming, batch 1: per-frame latency.
    n = args.stream_frames
    x = speech_like(1920 * (n + 5), seed=9)[None]
    codes = np.asarray(encode(params, jnp.asarray(x)))

    def ours_stream_decode():
        st = init_decoder_state(params, 1)
        st, y = decode_step(params, st, jnp.asarray(codes[:, :, 0]))  # compile + warm-up
        y.block_until_ready()
        times = []
        for i in range(1, n + 1):
            t0 = time.perf_counter()
            st, y = decode_step(params, st, jnp.asarray(codes[:, :, i]))
            y.block_until_ready()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def ours_stream_encode():
        st = init_encoder_state(params, 1)
        st, c = encode_step(params, st, jnp.asarray(x[:, :1920]))
        c.block_until_ready()
        times = []
        for i in range(1, n + 1):
            t0 = time.perf_counter()
            st, c = encode_step(params, st, jnp.asarray(x[:, 1920 * i:1920 * (i + 1)]))
            c.block_until_ready()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    def moshi_stream(kind):
        times = []
        with torch.no_grad(), moshi.streaming(batch_size=1):
            for i in range(n + 1):
                t0 = time.perf_counter()
                if kind == "decode":
                    moshi.decode(torch.from_numpy(codes[:, :, i:i + 1].astype(np.int64)))
                else:
                    moshi.encode(torch.from_numpy(x[:, None, 1920 * i:1920 * (i + 1)]))
                if i:
                    times.append(time.perf_counter() - t0)
        return float(np.median(times))

    stream = {"decode": {"ours": ours_stream_decode(), "moshi": moshi_stream("decode")},
              "encode": {"ours": ours_stream_encode(), "moshi": moshi_stream("encode")}}
    for op, d in stream.items():
        result[f"stream_{op}_ms_per_frame"] = {k: v * 1000 for k, v in d.items()}
        result[f"stream_{op}_speedup_vs_moshi"] = d["moshi"] / d["ours"]

    print(f"Mimi on {result['machine']}, {result['seconds']:.1f} s of audio, fp32; RTF = compute s per audio s")
    print(f"{'':14s} {'csm_jax':>10s} {'transformers':>13s} {'moshi':>10s} {'vs tf':>7s} {'vs moshi':>9s}")
    for name, ours, tf, mo in rows:
        print(f"{name:14s} {ours:10.4f} {tf:13.4f} {mo:10.4f} {tf / ours:6.2f}x {mo / ours:8.2f}x")
    for op, d in stream.items():
        print(f"stream {op:7s} {d['ours'] * 1000:8.1f}ms {'-':>13s} {d['moshi'] * 1000:8.1f}ms {'':7s} "
              f"{d['moshi'] / d['ours']:8.2f}x   (per 80 ms frame)")
    print(json.dumps(result))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
