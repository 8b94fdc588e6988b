"""Mimi speed and memory: csm_jax against transformers' MimiModel and moshi 0.2.2, same random weights, same
input, same run.

  python benchmarks/bench_mimi.py [--seconds 10] [--batches 1 8] [--stream-frames 50] [--long-seconds 600]

One-shot encode and decode of `seconds` of audio at each batch size, and streaming per-frame latency
(1920-sample chunks in, one frame of codes out; one frame in, 1920 samples out) at batch 1. Memory: XLA's
scratch (`memory_analysis().temp_size_in_bytes` of the compiled one-shot programs) at 1, 10 and 60 s and
`long_seconds`, which is then encoded and decoded once (batch 1), with the process's peak memory (CPU: peak
resident set; GPU/TPU: the device's peak bytes in use). Prints a table and one JSON line. Real-time factor
(RTF) = compute seconds per second of audio (lower is better).

The references are optional: a column is skipped when moshi or transformers is not installed. The random
weights come from moshi's model when it is there, else from transformers' (torch is needed for either).
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import tempfile
import time

import numpy as np
import tyro



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
    long_seconds: float = 600.0
    """A long file encoded and decoded once at batch 1, with its memory (0: skip)."""
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


def references(tmp):
    """(our params, {"moshi": model or None, "transformers": model or None}) on the same random weights."""
    import torch  # noqa: F401  (either reference needs it)
    from safetensors.numpy import save_file

    from csm_jax.mimi import load_mimi

    refs = {"moshi": None, "transformers": None}
    try:
        from csm_jax.testing.random_mimi import build_moshi_mimi, moshi_to_hf_tensors, save_moshi_layout

        refs["moshi"] = build_moshi_mimi(seed=0)
    except ImportError as e:
        print(f"moshi not available ({e}): its columns are skipped", flush=True)
    try:
        from transformers import MimiConfig as HFMimiConfig
        from transformers import MimiModel
    except ImportError as e:
        print(f"transformers not available ({e}): its columns are skipped", flush=True)
        MimiModel = None
    hf_dir = os.path.join(tmp, "hf")
    os.makedirs(hf_dir)
    if refs["moshi"] is not None:
        save_moshi_layout(refs["moshi"], os.path.join(tmp, "mimi.safetensors"))
        _, params = load_mimi(os.path.join(tmp, "mimi.safetensors"))
        if MimiModel is not None:
            sd = {k: v.numpy() for k, v in refs["moshi"].state_dict().items()}
            save_file(moshi_to_hf_tensors(sd), os.path.join(hf_dir, "model.safetensors"))
            with open(os.path.join(hf_dir, "config.json"), "w") as fh:
                json.dump(HFMimiConfig().to_dict(), fh)
            refs["transformers"] = MimiModel.from_pretrained(hf_dir).eval()
    elif MimiModel is not None:
        refs["transformers"] = MimiModel(HFMimiConfig()).eval()
        refs["transformers"].save_pretrained(hf_dir)
        _, params = load_mimi(hf_dir)
    else:
        raise SystemExit("error: random Mimi weights come from moshi or transformers; install either "
                         "(bash scripts/test.sh installs both)")
    return params, refs


def peak_memory_bytes():
    """The device's peak bytes in use (GPU/TPU), else this process's peak resident set (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"], "device peak bytes in use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak resident set"


def scratch_bytes(params, seconds):
    """XLA's scratch for one-shot encode and decode of `seconds` at batch 1, from the compiled programs."""
    import jax
    import jax.numpy as jnp

    from csm_jax.mimi import model as mimi_model

    L = int(seconds * 24000) // 1920 * 1920
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    enc = mimi_model._encode.lower(shapes, jax.ShapeDtypeStruct((1, L), jnp.float32), 32).compile()
    dec = mimi_model._decode.lower(shapes, jax.ShapeDtypeStruct((1, 32, L // 1920), jnp.int32)).compile()
    return enc.memory_analysis().temp_size_in_bytes, dec.memory_analysis().temp_size_in_bytes


def main(args: Args) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    from csm_jax.mimi import decode, decode_step, encode, encode_step, init_decoder_state, init_encoder_state
    from csm_jax.testing.inputs import speech_like

    if args.threads:
        torch.set_num_threads(args.threads)
    params, refs = references(tempfile.mkdtemp())
    moshi, hf = refs["moshi"], refs["transformers"]
    ref_names = [n for n, m in refs.items() if m is not None]

    L = int(args.seconds * 24000) // 1920 * 1920
    rows, result = [], {"machine": f"{jax.default_backend()} ({jax.devices()[0].device_kind}, {os.cpu_count()} cpus)",
                        "seconds": L / 24000, "torch_threads": torch.get_num_threads(), "references": ref_names}
    for B in args.batches:
        x = np.stack([speech_like(L, seed=s) for s in range(B)])
        xj, xt = jnp.asarray(x), torch.from_numpy(x)[:, None]
        codes = np.asarray(encode(params, xj))
        cj, ct = jnp.asarray(codes), torch.from_numpy(codes.astype(np.int64))
        t = {"encode": {"ours": best_of(lambda: encode(params, xj).block_until_ready(), args.repeats)},
             "decode": {"ours": best_of(lambda: decode(params, cj).block_until_ready(), args.repeats)}}
        with torch.no_grad():
            if hf is not None:
                t["encode"]["transformers"] = best_of(lambda: hf.encode(xt, num_quantizers=32), args.repeats)
                t["decode"]["transformers"] = best_of(lambda: hf.decode(ct), args.repeats)
            if moshi is not None:
                t["encode"]["moshi"] = best_of(lambda: moshi.encode(xt), args.repeats)
                t["decode"]["moshi"] = best_of(lambda: moshi.decode(ct), args.repeats)
        audio_s = B * L / 24000
        for op, d in t.items():
            rtf = {k: v / audio_s for k, v in d.items()}
            rows.append((f"{op} B={B}", rtf))
            speedups = {f"speedup_vs_{k}": v / d["ours"] for k, v in d.items() if k != "ours"}
            result[f"{op}_b{B}"] = {"rtf": rtf, **speedups}

    # Streaming, batch 1: per-frame latency.
    n = args.stream_frames
    x = speech_like(1920 * (n + 5), seed=9)[None]
    codes = np.asarray(encode(params, jnp.asarray(x)))

    def ours_stream(kind):
        st = init_decoder_state(params, 1) if kind == "decode" else init_encoder_state(params, 1)
        times = []
        for i in range(n + 1):  # step 0 compiles and warms up
            t0 = time.perf_counter()
            if kind == "decode":
                st, y = decode_step(params, st, jnp.asarray(codes[:, :, i]))
            else:
                st, y = encode_step(params, st, jnp.asarray(x[:, 1920 * i:1920 * (i + 1)]))
            y.block_until_ready()
            if i:
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

    stream = {}
    for op in ("decode", "encode"):
        stream[op] = {"ours": ours_stream(op)}
        if moshi is not None:
            stream[op]["moshi"] = moshi_stream(op)
        result[f"stream_{op}_ms_per_frame"] = {k: v * 1000 for k, v in stream[op].items()}
        if moshi is not None:
            result[f"stream_{op}_speedup_vs_moshi"] = stream[op]["moshi"] / stream[op]["ours"]

    # Memory: XLA's scratch by length (compiled, not run), then one long file through one-shot encode/decode.
    lengths = [s for s in (1, 10, 60) if s < args.long_seconds] + ([args.long_seconds] if args.long_seconds else [])
    scratch = {s: scratch_bytes(params, s) for s in lengths}
    result["scratch_mb"] = {f"{s:g}s": {"encode": e / 1e6, "decode": d / 1e6} for s, (e, d) in scratch.items()}
    if args.long_seconds:
        Ll = int(args.long_seconds * 24000) // 1920 * 1920
        xl = jnp.asarray(np.tile(speech_like(24000 * 10, seed=7), -(-Ll // 240000))[:Ll][None])
        t0 = time.perf_counter()
        cl = encode(params, xl).block_until_ready()
        enc_s = time.perf_counter() - t0
        del xl
        t0 = time.perf_counter()
        yl = decode(params, cl).block_until_ready()
        dec_s = time.perf_counter() - t0
        peak, what = peak_memory_bytes()
        result["long"] = {"seconds": Ll / 24000, "encode_s_with_compile": enc_s, "decode_s_with_compile": dec_s,
                          "frames": int(cl.shape[2]), "audio_samples": int(yl.shape[1]), "peak_mb": peak / 1e6,
                          "peak_is": what}
        del yl, cl

    names = ["ours", "transformers", "moshi"]
    print(f"Mimi on {result['machine']}, {result['seconds']:.1f} s of audio, fp32; RTF = compute s per audio s")
    print(f"{'':14s} {'csm_jax':>10s} {'transformers':>13s} {'moshi':>10s} {'vs tf':>7s} {'vs moshi':>9s}")
    fmt = lambda d, k, w: f"{d[k]:{w}.4f}" if k in d else f"{'-':>{w}s}"  # noqa: E731
    ratio = lambda d, k, w: f"{d[k] / d['ours']:{w - 1}.2f}x" if k in d else f"{'-':>{w}s}"  # noqa: E731
    for name, rtf in rows:
        print(f"{name:14s} {fmt(rtf, names[0], 10)} {fmt(rtf, names[1], 13)} {fmt(rtf, names[2], 10)} "
              f"{ratio(rtf, 'transformers', 7)} {ratio(rtf, 'moshi', 9)}")
    for op, d in stream.items():
        mo = f"{d['moshi'] * 1000:8.1f}ms" if "moshi" in d else f"{'-':>10s}"
        vs = f"{d['moshi'] / d['ours']:8.2f}x" if "moshi" in d else f"{'-':>9s}"
        print(f"stream {op:7s} {d['ours'] * 1000:8.1f}ms {'-':>13s} {mo} {'':7s} {vs}   (per 80 ms frame)")
    print("XLA scratch of the one-shot programs, batch 1 (MB): "
          + ", ".join(f"{s:g} s: encode {e / 1e6:.0f} / decode {d / 1e6:.0f}" for s, (e, d) in scratch.items()))
    if "long" in result:
        r = result["long"]
        print(f"{r['seconds']:.0f} s file, one-shot at batch 1: encode {r['encode_s_with_compile']:.1f} s, decode "
              f"{r['decode_s_with_compile']:.1f} s (with compilation), {r['peak_is']} {r['peak_mb']:.0f} MB")
    print(json.dumps(result))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
