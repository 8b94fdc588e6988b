"""CSM generation speed at full csm-1b size (random weights, no download), beside this machine's roofline.

  python benchmarks/bench_generate.py                       # batch sweep 1, 4, 16 on the default JAX backend
  python benchmarks/bench_generate.py --reference            # also transformers' generate, same work, same run
  python benchmarks/bench_generate.py --batches 1 --frames 16 --dtype bfloat16
  python benchmarks/bench_generate.py --size tiny --batches 1 2 --frames 4   # a quick check that it runs
  python benchmarks/bench_generate.py --batches 1 --quantize int8            # int8 weights, and their effect

The prompt is 64 text rows plus 2 s (25 frames) of context audio and its end-of-audio row; N frames are
generated per row (frame cap N, so rows run to the cap). Per batch size: frames/s per stream and in total,
real-time factor (compute seconds per second of audio, 80 ms per frame), ms per backbone step and per
depth-decoder pass (31 codebooks), time to the first frame (prefill + one frame), weight bytes read per
frame step, achieved GB/s and GFLOP/s, and compilations. The roofline (read bandwidth, matmul throughput) is
measured in the same run. Prints a table and one JSON line.

At batch 1 a frame is split into kernel classes, each timed alone (compiled, warmed up, best of 5) beside
its bandwidth bound (its weight bytes / the measured read bandwidth): the backbone step, the depth-decoder
pass (31 codebooks, greedy picks), sampling (32 top-k/temperature draws over 2051 logits), and the rest of
the measured frame time (host loop, dispatch, embedding and glue: frame - the three).

With `--quantize int8` the large matmul weights are int8 (csm_jax.quantize) and the run also reports the
greedy-code agreement and logit error against the unquantized weights over `--agreement-frames` frames
(teacher-forced: both read the unquantized model's codes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
import tyro

from csm_jax.engine import FRAMES_PER_CALL


@dataclasses.dataclass
class Args:
    size: str = "csm-1b"
    """Random weights at full csm-1b size, or tiny (test widths: a quick check that the benchmark runs)."""
    batches: tuple[int, ...] = (1, 4, 16)
    """Batch sizes to sweep."""
    frames: int = 24
    """Frames generated per row (timed)."""
    frames_per_call: int = FRAMES_PER_CALL
    """Frames per device call (one lax.scan)."""
    dtype: str = ""
    """float32 or bfloat16; default fp32 on CPU, bf16 elsewhere."""
    reference: bool = False
    """Also time transformers' CsmForConditionalGeneration.generate (fp32, CPU) on the same work."""
    reference_batches: tuple[int, ...] = (1,)
    """Batch sizes for the reference."""
    reference_frames: int = 8
    """Frames for the reference (it is slow)."""
    threads: int = 0
    """torch threads for the reference (0 = torch's default)."""
    quantize: str = "none"
    """none or int8: weight-only int8 for the large matmul weights (csm_jax.quantize)."""
    agreement_frames: int = 200
    """With --quantize int8: frames of greedy-code agreement against the unquantized weights (0: skip)."""


def weight_bytes_per_frame(params) -> tuple[int, int]:
    """(bytes read, flops per row) per frame step: backbone + c0 head once, decoder + projection + one head per
    codebook pass (the reference's access pattern: every pass reads the whole depth decoder)."""
    import jax

    def nbytes(tree):
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))

    def nparams(tree):
        return sum(x.size for x in jax.tree.leaves(tree))

    head = params["audio_head"][0]
    bb = nbytes(params["backbone"]) + nbytes(params["c0_head"])
    dd = nbytes(params["decoder"]) + nbytes(params["projection"]) + nbytes(head)
    flops = 2 * (nparams(params["backbone"]) + params["c0_head"].size
                 + 31 * (nparams(params["decoder"]) + params["projection"].size + head.size))
    return bb + 31 * dd, flops, bb, 31 * dd


def best_ms(fn, *args, repeats: int = 5) -> float:
    """Best of `repeats` calls after one to compile, in ms (roofline's timer)."""
    import roofline

    return roofline.best_time(fn, *args, repeats=repeats) * 1000


def run_ours(args, roof):
    import jax
    import jax.numpy as jnp

    from csm_jax import csm, llama
    from csm_jax.checkpoints import compute_dtype
    from csm_jax.csm import CsmConfig, GenState, generate_frames, init_params, prefill, prefill_pieces, set_sampling
    from csm_jax.evaluate import greedy_agreement
    from csm_jax.quantize import quantize_csm
    from csm_jax.sampling import codebook_noise, sample
    from csm_jax.testing.inputs import random_prompt

    cfg = CsmConfig.tiny() if args.size == "tiny" else CsmConfig.csm_1b()
    dtype = compute_dtype(args.dtype or None)
    t0 = time.perf_counter()
    params = init_params(cfg, jax.random.key(0), dtype)
    jax.block_until_ready(params)
    print(f"random {args.size} parameters ({jnp.dtype(dtype).name}) in {time.perf_counter() - t0:.1f} s", flush=True)
    quality = None
    if args.quantize != "none":
        t0 = time.perf_counter()
        qparams = jax.block_until_ready(quantize_csm(params, args.quantize))
        print(f"{args.quantize} weights in {time.perf_counter() - t0:.1f} s", flush=True)
        if args.agreement_frames:
            quality = greedy_agreement(cfg, params, qparams, args.agreement_frames)
            print(f"{args.quantize} vs {jnp.dtype(dtype).name}: {quality}", flush=True)
        params = qparams
        del qparams
    bytes_frame, flops_row, bytes_backbone, bytes_depth = weight_bytes_per_frame(params)

    # Kernel classes, timed alone: one backbone step, one depth-decoder pass, one frame's 32 draws.
    step = jax.jit(lambda p, x, pos, c: llama.forward(cfg.backbone, p, x, pos, c), donate_argnums=(3,))
    dec = jax.jit(lambda p, h, c0: csm.depth_decoder(cfg, p, h, c0, lambda lg, i: jnp.argmax(lg, -1).astype(jnp.int32)))

    @jax.jit
    def draws(logits, keys, temperature, topk):  # logits (32, B, V): c0 and the 31 codebooks of one frame
        # As csm's frame: the 32 draws' noise made in one go, then one draw per sequential step.
        noise = jnp.moveaxis(codebook_noise(keys, logits.shape[0], logits.shape[-1]), 1, 0)  # (32, B, V)

        def one(_, x):
            lg, nz = x
            return None, sample(lg, nz, temperature, topk, csm.MIMI_CODES)
        return jax.lax.scan(one, None, (logits, noise))[1]

    results = []
    for B in args.batches:
        tokens, mask, S = random_prompt(B)
        total = S + 1 + args.frames + args.frames_per_call
        cache = llama.init_cache(cfg.backbone, B, cfg.max_seq_len, dtype)
        x = jnp.zeros((B, 1, cfg.backbone.dim), dtype)
        pos = jnp.full((B, 1), total, jnp.int32)  # the last position the timed frames reach
        _, cache = step(params["backbone"], x, pos, cache)
        jax.block_until_ready(cache)
        t = []
        for _ in range(5):
            t0 = time.perf_counter()
            h, cache = step(params["backbone"], x, pos, cache)
            h.block_until_ready()
            t.append(time.perf_counter() - t0)
        backbone_ms = min(t) * 1000
        del cache
        h0 = jnp.zeros((B, cfg.backbone.dim), dtype)
        decoder_ms = best_ms(dec, params, h0, jnp.zeros((B,), jnp.int32))
        lg = jax.random.normal(jax.random.key(1), (cfg.num_codebooks, B, cfg.audio_vocab_size), jnp.float32)
        sampling_ms = best_ms(draws, lg, jax.random.split(jax.random.key(2), B), jnp.full((B,), 0.9),
                              jnp.full((B,), 50, jnp.int32))

        def start():
            st = GenState.create(cfg, B, dtype)
            for t, m, n in prefill_pieces(tokens, mask, [S] * B):  # as the library prefills
                st = prefill(params, cfg, st, t, m, n)
            return set_sampling(st, jnp.arange(B), jnp.full(B, 0.9), jnp.full(B, 50), jnp.arange(B),
                                jnp.full(B, args.frames + 1 + args.frames_per_call))

        # Compile (prefill, 1-frame and F-frame calls), then time to first frame.
        st = start()
        st, f, _ = generate_frames(params, cfg, st, 1)
        st, f, _ = generate_frames(params, cfg, st, args.frames_per_call)
        f.block_until_ready()
        del st
        t0 = time.perf_counter()
        st = start()
        st, f, _ = generate_frames(params, cfg, st, 1)
        f.block_until_ready()
        ttff = time.perf_counter() - t0
        calls = -(-args.frames // args.frames_per_call)
        t0 = time.perf_counter()
        valid_total = 0
        for _ in range(calls):
            st, f, v = generate_frames(params, cfg, st, args.frames_per_call)
            valid_total += int(np.asarray(v).sum())  # one host copy per F frames, as a server would
        el = time.perf_counter() - t0
        frames_done = calls * args.frames_per_call
        assert valid_total == B * frames_done, "a row stopped early (EOS): timing would be off"
        fps_stream = frames_done / el
        frame_ms = 1000 / fps_stream
        bw = roof["read_gbs"] * 1e9
        r = {
            "batch": B, "frames_per_s_stream": fps_stream, "frames_per_s_total": fps_stream * B,
            "rtf": 1 / (fps_stream * 0.08), "backbone_step_ms": backbone_ms, "depth_decoder_ms": decoder_ms,
            "sampling_ms": sampling_ms, "frame_ms": frame_ms,
            "other_ms": frame_ms - backbone_ms - decoder_ms - sampling_ms,
            "backbone_bound_ms": 1000 * bytes_backbone / bw, "depth_decoder_bound_ms": 1000 * bytes_depth / bw,
            "frame_bound_ms": 1000 * bytes_frame / bw,
            "ttff_s": ttff, "weight_gb_per_frame_step": bytes_frame / 1e9,
            "achieved_gbs": bytes_frame * fps_stream / 1e9,
            "achieved_gflops": flops_row * B * fps_stream / 1e9,
            "bandwidth_bound_fps": bw / bytes_frame,
            "compute_bound_fps_total": roof["matmul_gflops"] * 1e9 / flops_row,
            "compilations": generate_frames._cache_size(),
        }
        r["pct_of_bandwidth_bound"] = 100 * fps_stream / r["bandwidth_bound_fps"]
        r["pct_of_compute_bound"] = 100 * r["frames_per_s_total"] / r["compute_bound_fps_total"]
        results.append(r)
        print(f"B={B}: {r['frames_per_s_total']:.2f} frames/s total, {fps_stream:.2f}/stream", flush=True)
        del st
    return results, quality


class _Clock:
    """A transformers streamer that notes when generate hands it each frame (the clock of one run: a time
    taken from another run, as a first frame timed alone, can exceed a short run's, noise that made the frame
    rate negative)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_reference(args, batches):
    import torch
    from transformers import CsmConfig as HFCsmConfig
    from transformers import CsmForConditionalGeneration

    from csm_jax.testing.inputs import random_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.125, "high_freq_factor": 0.5,
            "original_max_position_embeddings": 1024}
    drope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 0.001953125, "high_freq_factor": 0.0078125,
             "original_max_position_embeddings": 16}
    if args.size == "tiny":
        from csm_jax.testing.tiny_csm import tiny_hf_config

        cfg = tiny_hf_config()
    else:
        cfg = HFCsmConfig(rope_scaling=rope, depth_decoder_config={"rope_scaling": drope})
    t0 = time.perf_counter()
    model = CsmForConditionalGeneration(cfg).eval()
    print(f"transformers {args.size} (random, fp32) in {time.perf_counter() - t0:.1f} s", flush=True)
    _, _, S = random_prompt(1)
    out = {}
    for B in batches:
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, 128000, (B, S)))
        gen = dict(do_sample=True, top_k=50, temperature=0.9, depth_decoder_do_sample=True, depth_decoder_top_k=50,
                   depth_decoder_temperature=0.9)
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, **gen)  # warm-up
            clock = _Clock()
            t0 = time.perf_counter()
            codes = model.generate(input_ids=ids, max_new_tokens=args.reference_frames,
                                   min_new_tokens=args.reference_frames, streamer=clock, **gen)
        n = np.asarray(codes).shape[1]
        frames = clock.times[-n:]  # the streamer is handed the prompt first, then each frame as it is made
        ttff = frames[0] - t0
        fps = (n - 1) / (frames[-1] - frames[0])  # frames after the first: excludes the prefill, as for ours
        out[B] = {"frames_per_s_stream": fps, "frames_per_s_total": fps * B, "ttff_s": ttff}
        print(f"transformers B={B}: {fps * B:.2f} frames/s total", flush=True)
    return out


def main(args: Args) -> None:
    import jax

    import roofline

    roof = roofline.measure()
    if args.quantize not in ("none", "int8"):
        raise SystemExit(f"error: --quantize {args.quantize}: use none or int8")
    ours, quality = run_ours(args, roof)
    ref = run_reference(args, args.reference_batches) if args.reference else {}
    base = ref.get(1, {}).get("frames_per_s_stream")
    weights = "" if args.quantize == "none" else f", {args.quantize} weights"
    print(f"\nCSM ({args.size}{weights}) generation on {roof['backend']} ({roof['device']}, {os.cpu_count()} cpus), "
          f"roofline: {roof['read_gbs']:.1f} GB/s read, {roof['matmul_gflops']:.0f} GFLOP/s fp32 matmul")
    hdr = (f"{'B':>3s} {'fr/s/str':>9s} {'fr/s tot':>9s} {'RTF':>6s} {'bb ms':>7s} {'dd ms':>7s} {'TTFF s':>7s} "
           f"{'GB/s':>6s} {'%bw':>5s} {'GFLOP/s':>8s} {'%mm':>5s} {'comp':>4s}" + ("  vs tf B=1" if base else ""))
    print(hdr)
    for r in ours:
        line = (f"{r['batch']:3d} {r['frames_per_s_stream']:9.3f} {r['frames_per_s_total']:9.3f} {r['rtf']:6.2f} "
                f"{r['backbone_step_ms']:7.1f} {r['depth_decoder_ms']:7.1f} {r['ttff_s']:7.2f} "
                f"{r['achieved_gbs']:6.1f} {r['pct_of_bandwidth_bound']:5.0f} {r['achieved_gflops']:8.1f} "
                f"{r['pct_of_compute_bound']:5.0f} {r['compilations']:4d}")
        if base:
            r["total_vs_transformers_b1"] = r["frames_per_s_total"] / base
            line += f"  {r['total_vs_transformers_b1']:8.2f}x"
        print(line)
    for r in ours:
        if r["batch"] != 1:
            continue
        print(f"\nBatch 1, one frame by kernel class (each timed alone), ms, beside its bandwidth bound:")
        print(f"  backbone step {r['backbone_step_ms']:9.2f}   bound {r['backbone_bound_ms']:8.2f}")
        print(f"  depth pass    {r['depth_decoder_ms']:9.2f}   bound {r['depth_decoder_bound_ms']:8.2f}"
              f"   ({r['depth_decoder_ms'] / 31 * 1000:.0f} us per codebook)")
        print(f"  sampling      {r['sampling_ms']:9.2f}   (32 draws)")
        print(f"  host & other  {r['other_ms']:9.2f}   (measured frame - the three)")
        print(f"  frame         {r['frame_ms']:9.2f}   bound {r['frame_bound_ms']:8.2f}")
    if quality:
        print(f"\n{args.quantize} against unquantized weights over {quality['frames']} teacher-forced frames: "
              f"greedy codes {100 * quality['code_agreement']:.1f}% equal (c0 {100 * quality['c0_agreement']:.1f}%,"
              f" depth {100 * quality['depth_agreement']:.1f}%); logit error max/rms, in units of the logits' "
              f"std: c0 {quality['c0_logit_error']:.3f}/{quality['c0_logit_rms']:.4f}, depth "
              f"{quality['depth_logit_error']:.3f}/{quality['depth_logit_rms']:.4f}; free-running greedy "
              f"first differs at frame {quality['first_divergence']}")
    for B, r in ref.items():
        print(f"transformers B={B}: {r['frames_per_s_stream']:.3f} frames/s per stream, "
              f"{r['frames_per_s_total']:.3f} total, first frame {r['ttff_s']:.2f} s")
    print(json.dumps({"size": args.size, "quantize": args.quantize, "roofline": roof, "ours": ours,
                      "quantization_quality": quality, "transformers": ref, "jax": jax.__version__}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
