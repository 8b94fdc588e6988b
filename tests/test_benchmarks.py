"""The generation benchmark runs end to end (tiny widths, ours and transformers' generate in the same run)
and reports what it promises. Its figures are not checked here: speed is the benchmark's business."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_generate_runs_and_reports():
    out = subprocess.run([sys.executable, "benchmarks/bench_generate.py", "--size", "tiny", "--batches", "1", "2",
                          "--frames", "4", "--frames-per-call", "2", "--reference", "--reference-frames", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["size"] == "tiny"
    assert result["roofline"]["read_gbs"] > 0 and result["roofline"]["matmul_gflops"] > 0
    assert [r["batch"] for r in result["ours"]] == [1, 2]
    for r in result["ours"]:
        for key in ("frames_per_s_stream", "frames_per_s_total", "rtf", "backbone_step_ms", "depth_decoder_ms",
                    "ttff_s", "achieved_gbs", "achieved_gflops", "pct_of_bandwidth_bound", "pct_of_compute_bound",
                    "total_vs_transformers_b1"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        assert r["frames_per_s_total"] == r["frames_per_s_stream"] * r["batch"]
        assert r["compilations"] >= 1
    assert result["transformers"]["1"]["frames_per_s_stream"] > 0
    # The table: a header and one row per batch size, with the ratio to transformers.
    table = lines[lines.index(next(l for l in lines if l.lstrip().startswith("B "))):]
    assert table[1].split()[0] == "1" and table[1].rstrip().endswith("x")


def test_bench_server_conversations_runs_and_reports(csm_dir, asr_model, tmp_path):
    """bench_server.py starts the server itself (converse, stub LLM) and drives one conversation of one turn
    spoken by espeak-ng: the turn is answered with audio and every stage is reported."""
    from converse_fixtures import speak

    turn = speak("Hello, how are you today?", tmp_path / "turn.wav")
    out = subprocess.run([sys.executable, "benchmarks/bench_server.py", "--checkpoint", str(csm_dir), "--slots", "1",
                          "--no-warmup", "--conversations", "1", "--turns", "1", "--turn-audio", str(turn),
                          "--asr-model", asr_model, "--startup-timeout", "300"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])["conversations"]
    assert row["conversations"] == 1 and row["turns"] == 1 and row["failed"] == 0, row
    for key in ("end_to_audio_s", "asr_s", "llm_s", "csm_s"):
        assert row[f"{key}_p50"] is not None and row[f"{key}_p50"] > 0, (key, row)
    assert row["end_to_audio_s_p50"] >= row["asr_s_p50"]


def test_bench_server_plain_levels_run_and_report(csm_dir):
    """bench_server.py --checkpoint starts the server itself and reports a plain level: the request is served
    (no failure), its first audio and audio rate measured."""
    out = subprocess.run([sys.executable, "benchmarks/bench_server.py", "--checkpoint", str(csm_dir), "--slots", "1",
                          "--no-warmup", "--clients", "1", "--requests", "1", "--max-audio-ms", "320",
                          "--startup-timeout", "300"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    (level,) = json.loads(out.stdout.strip().splitlines()[-1])["levels"]
    assert level["clients"] == 1 and level["requests"] == 1 and level["failed"] == 0, level
    assert level["ttfb_p50_s"] > 0 and level["audio_s_per_wall_s"] > 0
    # 320 ms cap: four frames at most (fewer if the random model ends its speech early).
    assert 0 < level["audio_s_per_wall_s"] * level["wall_s"] <= 0.32 + 1e-9


def test_profile_frame_splits_the_trace_into_classes(tmp_path):
    """profile_frame.py on the tiny model (CPU: XLA's ops are thunks on host threads): every class is in the
    table, the class totals add up to the total, and the total equals the frame program's op events read back
    independently from the perfetto JSON that jax's profiler wrote beside the .xplane.pb the script parsed."""
    import gzip

    out = subprocess.run([sys.executable, "benchmarks/profile_frame.py", "--size", "tiny", "--frames-per-call", "2",
                          "--calls", "1", "--warmup", "0", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    r = json.loads((tmp_path / "profile.json").read_text())
    assert printed["total_us_per_frame"] == r["total_us_per_frame"]
    classes = r["classes"]
    assert list(classes)[:6] == ["backbone layers", "depth-decoder layers", "depth attention", "sampling",
                                 "embeddings/projection/heads", "copies/other"]
    total, kernels = r["total_us_per_frame"], r["kernels_per_frame"]
    assert total > 0 and kernels > 0 and r["wall_us_per_frame"] > 0 and r["busy_us_per_frame"] > 0
    assert math.isclose(sum(c["us_per_frame"] for c in classes.values()), total, rel_tol=1e-9)
    assert math.isclose(sum(c["kernels_per_frame"] for c in classes.values()), kernels, rel_tol=1e-9)
    for name in ("backbone layers", "depth-decoder layers", "depth attention", "sampling",
                 "embeddings/projection/heads"):
        assert classes[name]["us_per_frame"] > 0 and classes[name]["kernels_per_frame"] > 0, name
    assert math.isclose(sum(r["sampling_parts"].values()), classes["sampling"]["us_per_frame"], rel_tol=1e-9)
    assert r["sampling_parts"]["argmax (greedy and the draw)"] > 0 and r["sampling_parts"]["top-k"] > 0
    # The codebook scan: codebooks 2..31 of each frame (tiny has 32 codebooks, as csm-1b).
    assert r["depth_step_trip_count"] == 30 and r["depth_step_kernels"] > 0 and r["depth_kernels_per_codebook"] > 0
    # Independent reading: the perfetto JSON's events for the same ops, summed per frame.
    (perfetto,) = tmp_path.glob("trace/plugins/profile/*/perfetto_trace.json.gz")
    names = {o["op"] for o in r["ops"]}
    events = [e for e in json.load(gzip.open(perfetto))["traceEvents"]
              if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == "jit_run_frames"
              and e["args"].get("hlo_op") in names]
    frames = r["calls_traced"] * r["frames_per_call"]
    assert math.isclose(len(events) / frames, kernels, rel_tol=1e-9)
    assert math.isclose(sum(e["dur"] for e in events) / frames, total, rel_tol=1e-3)
    # The printed table shows the same figures.
    rows = {line[:32].strip(): line[32:].split() for line in (tmp_path / "table.txt").read_text().splitlines()}
    for name, c in classes.items():
        assert math.isclose(float(rows[name][1]), c["us_per_frame"], abs_tol=0.051), (name, rows[name])
    assert math.isclose(float(rows["total (op time)"][1]), total, abs_tol=0.051)


def test_profile_frame_reads_a_device_lane(tmp_path):
    """profile_frame.py's reading of a GPU trace, on a hand-built one (no GPU here): the device plane's stream
    line is read, not the XLA Ops line derived from it nor the host's thunks; an event is attributed by its
    hlo_op annotation or else by its kernel's name, another module's kernel is left out, a copy no op made
    counts as copies/other and an unknown kernel as unattributed. Figures by hand: 10 + 3 + 1 + 2 us."""
    import jax
    import jax.numpy as jnp
    from jax.profiler import ProfileData

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_frame as pf

    def f(x, w):
        with jax.named_scope("depth_decoder"), jax.named_scope("transformer"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("sampling"):
            return jnp.argmax(y, -1)

    hlo = jax.jit(f).lower(jnp.ones((4, 8)), jnp.ones((8, 2051))).compile().as_text()
    _, instrs, _ = pf.parse_hlo(hlo)
    layer = next(n for n, i in instrs.items() if i.computation.startswith("main") and "transformer" in i.op_name
                 and i.opcode in ("fusion", "dot", "custom-call"))
    argmax = next(n for n, i in instrs.items() if i.computation.startswith("main") and "sampling" in i.op_name
                  and i.opcode == "fusion")
    (tmp_path / "frame_hlo.txt").write_text(hlo)
    names = ["kernel_of_the_matmul", pf._sanitize(argmax), "MemcpyD2H", "sm90_xmma_gemm", "other", "dup", "thunk"]
    stats = ["hlo_op", "hlo_module"]

    def line(lid, lname, evs):
        out, t = f'lines {{ id: {lid} name: "{lname}" timestamp_ns: 1000 ', 0
        for name, us, st in evs:
            kv = "".join(f'stats {{ metadata_id: {stats.index(k) + 1} str_value: "{v}" }} ' for k, v in st.items())
            out += (f"events {{ metadata_id: {names.index(name) + 1} offset_ps: {t * 10**6} "
                    f"duration_ps: {us * 10**6} {kv}}} ")
            t += us + 1
        return out + "} "

    meta = "".join(f'event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }} ' for i, n in enumerate(names, 1))
    meta += "".join(f'stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }} ' for i, n in enumerate(stats, 1))
    module = {"hlo_module": "jit_f"}
    stream = [("kernel_of_the_matmul", 10, {"hlo_op": layer} | module), (pf._sanitize(argmax), 3, {}),
              ("MemcpyD2H", 1, {}), ("sm90_xmma_gemm", 2, {}), ("other", 50, {"hlo_op": layer, "hlo_module": "jit_g"})]
    proto = (f'planes {{ id: 1 name: "/device:GPU:0" {line(7, "Stream #7(Compute)", stream)}'
             f'{line(8, "XLA Ops", [("dup", 100, {"hlo_op": layer} | module)])}{meta}}} '
             f'planes {{ id: 2 name: "/host:CPU" {line(1, "tf_XLA", [("thunk", 500, {"hlo_op": layer} | module)])}'
             f'{meta}}}')
    run = tmp_path / "trace" / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    (run / "host.xplane.pb").write_bytes(ProfileData.text_proto_to_serialized_xspace(proto))
    r = pf.analyse(str(tmp_path), {"model": "hand-built", "batch": 1, "dtype": "float32", "frames_per_call": 1,
                                   "calls_traced": 1, "backend": "gpu", "device": "none", "jax": jax.__version__,
                                   "compile_s": 0.0, "wall_us_per_frame": 20.0, "traced_wall_us_per_frame": 20.0,
                                   "num_codebooks": 32, "audio_vocab_size": 2051, "unscoped": []}, 10)
    assert r["lane"].startswith("device /device:GPU:0: Stream #7(Compute)")
    got = {c: (v["kernels_per_frame"], round(v["us_per_frame"], 6)) for c, v in r["classes"].items()}
    assert got == {"backbone layers": (0, 0), "depth-decoder layers": (1, 10), "depth attention": (0, 0),
                   "sampling": (1, 3), "embeddings/projection/heads": (0, 0), "copies/other": (1, 1),
                   "unattributed": (1, 2)}, got
    assert r["total_us_per_frame"] == 16 and r["busy_us_per_frame"] == 16
    assert r["sampling_parts"] == {"argmax (greedy and the draw)": 3.0}
