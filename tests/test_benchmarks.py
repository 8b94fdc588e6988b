"""The benchmarks run end to end (tiny widths) and report what they promise; the accelerator command keeps to
its budget and writes each figure as it is measured; the server benchmark counts what it should as failures.
Speed figures are not checked here: speed is the benchmarks' business."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_generate_runs_and_reports():
    # The frames and frames per call of accelerator.py --quick's generate_b1 stage (two calls a row), so the test
    # of that command below loads this run's batch-1 programs from the compilation cache instead of compiling them.
    out = subprocess.run([sys.executable, "benchmarks/bench_generate.py", "--size", "tiny", "--batches", "1", "2",
                          "--frames", "8", "--frames-per-call", "4", "--reference", "--reference-frames", "3"],
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_accelerator_quick_writes_each_figure_when_measured(csm_dir, tmp_path):
    """accelerator.py --quick (tiny sizes, CPU) runs the headline stages in order and writes each figure into
    figures.jsonl when it is measured: batch 1 beside its bandwidth bound, then one server (its own log in the
    output folder) at 2, 4 and 1 streams, each level's line written when that level ended (before the next one
    began). Every request delivered exactly its 320 ms (4 frames of 1,920 samples, 16-bit).

    Then the cost model: a table in simulate_serving.py's --table format measured at the server's 4 slots (the
    generation program runs at 1 row and at every slot: ROW_BUCKETS' only count below 4 is 1; prefill in groups of
    1 request, timed at the shortest and longest piece, 32 and 128 rows), F x (frame + Mimi) being the measured
    step at each; then the simulation on that table for the server's three levels, the same figures as
    simulate_serving.py --table gives for them, beside the figures the server measured."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "benchmarks/accelerator.py", str(csm_dir), str(out), "--quick",
                          "--only", "generate_b1", "server", "cost_model", "--budget", "900"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "figures.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["event"], r.get("figure")) for r in lines] == [
        ("device", "figure", None), ("server", "figure", "slots"),
        ("generate_b1", "start", None), ("generate_b1", "figure", None), ("generate_b1", "end", None),
        ("server", "start", None), ("server", "figure", "ready"), *[("server", "figure", "level")] * 3,
        ("server", "end", None), ("cost_model", "start", None), ("cost_model", "figure", "table"),
        *[("cost_model", "figure", "scenario")] * 3, ("cost_model", "end", None),
        *[(s, "skipped", None) for s in ("profile_b1", "int8", "mimi", "conversations", "train")]]
    b1 = lines[3]
    assert b1["size"] == "tiny" and b1["frames_per_s_stream"] > 0 and b1["bandwidth_bound_fps"] > 0
    assert math.isclose(b1["pct_of_bandwidth_bound"], 100 * b1["frames_per_s_stream"] / b1["bandwidth_bound_fps"])
    assert math.isclose(b1["bandwidth_bound_fps"] * b1["frame_bound_ms"], 1000, rel_tol=1e-9)
    assert lines[4]["status"] == "ok" and lines[10]["status"] == "ok" and lines[16]["status"] == "ok"
    levels = lines[7:10]
    assert [r["clients"] for r in levels] == [2, 4, 1]
    for r in levels:
        assert r["requests"] == r["clients"] and r["failed"] == 0 and r["ended_early"] == 0, r
        assert math.isclose(r["audio_s_per_wall_s"] * r["wall_s"], 0.32 * r["requests"], rel_tol=1e-9), r
        assert r["ttfb_p50_s"] > 0
    # Written as each level ended: a level's line is at least that level's duration after the previous line.
    for before, r in zip(lines[6:9], levels):
        assert r["time"] - before["time"] >= r["wall_s"] - 0.01, (before, r)

    table = json.loads((out / "cost_table.json").read_text())
    assert list(table) == ["device", "frame_ms", "mimi_ms", "read_gbs", "prefill_tflops"]
    assert [R for R, _ in table["frame_ms"]] == [R for R, _ in table["mimi_ms"]] == [1, 4]
    assert all(ms > 0 for _, ms in table["mimi_ms"]) and table["read_gbs"] > 0 and table["prefill_tflops"] > 0
    costs = lines[12]
    assert {k: costs[k] for k in table} == table and costs["table"] == str(out / "cost_table.json")
    assert [R for R, _ in costs["step_ms"]] == [1, 4] and costs["frames_per_call"] == 4
    for (_, step), (_, frame), (_, mimi) in zip(costs["step_ms"], table["frame_ms"], table["mimi_ms"]):
        assert step > 0 and math.isclose(4 * (frame + mimi), step, rel_tol=1e-9)
    assert [(c["requests"], c["rows_each"], c["rows"]) for c in costs["prefill_calls"]] == [(1, 32, 32), (1, 128, 128)]
    assert costs["prompt_rows"] == 17  # bench_server.py's text (simulate_serving's default says so too)
    sim = subprocess.run([sys.executable, "benchmarks/simulate_serving.py", "--table", str(out / "cost_table.json"),
                          "--slots", "4", "--at-once", "2", "4", "1", "--poisson", "--max-audio-ms", "320",
                          "--prompt-rows", "17", "--start-buffer-ms", "300"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert sim.returncode == 0, sim.stderr[-3000:]
    alone = json.loads(sim.stdout.strip().splitlines()[-1])["scenarios"]
    for r, s, level in zip(lines[13:16], alone, levels):
        p, m = r["predicted"], r["measured"]
        assert r["scenario"] == s["scenario"] and r["requests"] == s["requests"] == level["clients"]
        assert (p["first_audio_p50_s"], p["first_audio_p95_s"], p["real_time_streams"], p["steps"]) == \
            (s["first_audio_p50_s"], s["first_audio_p95_s"], s["realtime_streams"], s["steps"])
        assert math.isclose(p["audio_s_per_wall_s"], 0.32 * s["requests"] / s["simulated_s"], rel_tol=1e-9)
        assert (m["first_audio_p50_s"], m["first_audio_p95_s"], m["real_time_streams"], m["failed"]) == \
            (level["ttfb_p50_s"], level["ttfb_p95_s"], level["real_time_streams"], 0)
        assert math.isclose(r["measured_over_predicted"]["first_audio_p95_s"],
                            m["first_audio_p95_s"] / p["first_audio_p95_s"], rel_tol=1e-9)
    assert lines[-1]["reason"] == "not among --only generate_b1 server cost_model"
    assert lines[-2]["reason"] == "needs --turn-audio and --asr-model"
    assert "Uvicorn running" in (out / "serve.log").read_text()
    summary = (out / "summary.txt").read_text()
    assert (out / "generate_b1.log").stat().st_size > 0 and "4 streams: 0 failed" in summary
    assert "4 at once, predicted / measured: first audio p50" in summary


@pytest.mark.slow
def test_accelerator_budget_skips_stops_and_goes_on(tmp_path):
    """run_stages on stand-in stages: a stage expected to overrun the budget left is skipped with the reason, one
    that overruns its limit is stopped there (with the process it started) and keeps the lines it wrote, a failing
    one is recorded, and the stages after them still run; the last one is stopped at the budget's end."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accelerator as acc

    figures = tmp_path / "figures.jsonl"
    child = tmp_path / "child.pid"
    py = lambda code: lambda limit: [sys.executable, "-c", code]  # noqa: E731
    hang = (f"import json, subprocess, time; p = subprocess.Popen(['sleep', '300']); "
            f"open({str(child)!r}, 'w').write(str(p.pid)); "
            f"open({str(figures)!r}, 'a').write(json.dumps({{'stage': 'hang', 'event': 'figure', 'n': 1}}) + '\\n'); "
            f"time.sleep(300)")
    plan = [acc.Stage("first", 1, 30, py("import json; print('x'); print(json.dumps({'fps': 2.5}))"),
                      lambda r: {"fps": r["fps"]}),
            acc.Stage("hang", 1, 2, py(hang)),
            acc.Stage("too_long", 1000, 2000, py("print('never run')")),
            acc.Stage("fails", 1, 30, py("raise SystemExit(3)")),
            acc.Stage("no_json", 1, 30, py("print('no figures')"), lambda r: r),
            acc.Stage("last", 1, 300, py("import time; time.sleep(300)"))]
    t0 = time.monotonic()
    bad = acc.run_stages(plan, acc.Recorder(tmp_path), budget=14)
    took = time.monotonic() - t0
    assert bad == 4 and 12 < took < 40, (bad, took)
    lines = [json.loads(line) for line in figures.read_text().splitlines()]
    events = [(r["stage"], r["event"]) for r in lines]
    assert events == [("first", "start"), ("first", "figure"), ("first", "end"), ("hang", "start"),
                      ("hang", "figure"), ("hang", "end"), ("too_long", "skipped"), ("fails", "start"),
                      ("fails", "end"), ("no_json", "start"), ("no_json", "end"), ("last", "start"), ("last", "end")]
    by = {(r["stage"], r["event"]): r for r in lines}
    assert by["first", "figure"]["fps"] == 2.5 and by["first", "end"]["status"] == "ok"
    assert by["hang", "end"]["status"] == "killed at its limit (2 s)" and 2 <= by["hang", "end"]["seconds"] < 10
    with pytest.raises(ProcessLookupError):  # the stage's own child was stopped with it
        os.kill(int(child.read_text()), 0)
    assert by["too_long", "skipped"]["reason"].startswith("expected 1000 s, ")
    assert by["fails", "end"]["status"] == "failed (exit 3)"
    assert by["no_json", "end"]["status"] == "failed (no JSON line)"
    left = by["last", "start"]["limit_s"]
    assert left < 14 - 2 and by["last", "end"]["status"].startswith("killed at its limit")
    assert math.isclose(by["last", "end"]["seconds"], left, abs_tol=3)


def test_accelerator_takes_the_slots_from_the_device(tmp_path, monkeypatch):
    """Without --slots and without serve.py's --slots auto, the server gets 1,024 slots on a device of 120 GB or
    more, 640 on 70 GB or more, else 256, from nvidia-smi (a stand-in here printing an H200's, an H100's, or
    failing); the device's line is recorded as nvidia-smi gives it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import accelerator as acc

    assert acc.serve_takes_auto() in (True, False)  # reads the real serve.py's --help without failing
    monkeypatch.setattr(acc, "serve_takes_auto", lambda: False)
    fake = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name, mib, rc, slots in (("NVIDIA H200", 143771, 0, "1024"), ("NVIDIA H100 80GB HBM3", 81559, 0, "640"),
                                 ("x", 0, 9, "256")):
        fake.write_text(f"#!/bin/sh\ncase \"$1\" in *name*) echo '{name}, {mib}, 570.86.15';; *) echo {mib};; esac\n"
                        f"exit {rc}\n")
        fake.chmod(0o755)
        assert acc.device_slots(quick=False)[0] == slots, name
        assert acc.device_info()["gpus"] == ([f"{name}, {mib}, 570.86.15"] if rc == 0 else [])
    assert acc.device_slots(quick=True)[0] == "4"


def test_bench_server_counts_short_cut_and_wrong_audio_as_failures():
    """bench_server's client against a stand-in server: 4 whole frames asked for; a complete stream passes, a
    short one properly ended fails (or, with --no-full-length, counts as ended by speech), a stream cut before
    its last chunk, audio that is not whole frames or longer than asked, and a 503 fail."""
    import http.server
    import threading

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_server as bs

    frame = 3840  # 1920 samples of 16-bit PCM: 80 ms at 24 kHz, by hand

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - http.server's name
            seed = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["seed"]
            if seed == 5:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            sizes = {0: [frame] * 4, 1: [frame] * 2, 2: [frame] * 2, 3: [frame] * 4 + [100], 4: [frame] * 5}[seed]
            for n in sizes:
                self.wfile.write(b"%x\r\n" % n + bytes(n) + b"\r\n")
            if seed == 2:  # cut: the connection closes without the last chunk
                self.wfile.flush()
                self.connection.shutdown(2)
                self.close_connection = True
                return
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for full_length in (True, False):
            args = bs.Args(url=url, max_audio_ms=320, full_length=full_length)
            got = {}
            for seed in range(6):
                with bs.http_client(url) as http:
                    got[seed] = bs.one(args, url, seed, http)
                assert got[seed].pop("start") > 0
            assert got[0]["ok"] and got[0]["audio_s"] == 0.32 and not got[0]["ended_early"]
            if full_length:
                assert got[1] == {"ok": False, "why": "short", "bytes": 2 * frame}
            else:
                assert got[1]["ok"] and got[1]["ended_early"] and got[1]["audio_s"] == 0.16
            assert not got[2]["ok"] and got[2]["why"] == "transport: RemoteProtocolError", got[2]
            assert got[3] == {"ok": False, "why": "not whole frames", "bytes": 4 * frame + 100}
            assert got[4] == {"ok": False, "why": "longer than asked", "bytes": 5 * frame}
            assert got[5] == {"ok": False, "why": "status 503"}
    finally:
        server.shutdown()


@pytest.mark.slow
def test_bench_server_counts_a_stream_cut_by_a_failed_step(csm_dir, tmp_path):
    """A real server whose engine step fails (injected) after the stream's first audio ends that stream without
    its last chunk: bench_server counts the request as failed, not as a short success."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import sys\n"
        "if sys.argv and sys.argv[0].endswith('serve.py'):\n"
        "    from csm_jax import engine\n"
        "    step, state = engine.Engine.step, {'audio': False, 'failed': False}\n"
        "    def faulty(self):\n"
        "        if state['audio'] and not state['failed']:\n"
        "            state['failed'] = True\n"
        "            raise RuntimeError('injected step failure')\n"
        "        events = step(self)\n"
        "        state['audio'] = state['audio'] or any(ev.audio.size for ev in events.values())\n"
        "        return events\n"
        "    engine.Engine.step = faulty\n")
    env = {**os.environ, "PYTHONPATH": f"{inject}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run = subprocess.run([sys.executable, "benchmarks/bench_server.py", "--checkpoint", str(csm_dir), "--slots", "1",
                          "--no-warmup", "--clients", "1", "--requests", "1", "--max-audio-ms", "1600",
                          "--startup-timeout", "300", "--server-log", str(tmp_path / "serve.log")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    (level,) = json.loads(run.stdout.strip().splitlines()[-1])["levels"]
    assert level["failed"] == 1 and level["failures"] == {"transport: RemoteProtocolError": 1}, level
    assert "injected step failure" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_bench_server_stops_at_once_when_the_server_cannot_start(csm_dir, tmp_path):
    """A server that exits at start-up (no checkpoint there), and one whose warm-up fails (injected: its engine
    thread dies while /health would say "warming"), end bench_server with status 1 and the cause within seconds
    of it, not after --startup-timeout (600 s here); the cause is in --figures and the server's log."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import sys\n"
        "if sys.argv and sys.argv[0].endswith('serve.py'):\n"
        "    from csm_jax import engine\n"
        "    def warmup(self, *a, **k):\n"
        "        raise RuntimeError('injected warm-up failure')\n"
        "    engine.Engine.warmup = warmup\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    injected = {"PYTHONPATH": f"{inject}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for name, ckpt, env in (("exits", empty, {}), ("warmup", csm_dir, injected)):
        figures, log = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.log"
        t0 = time.monotonic()
        run = subprocess.run([sys.executable, "benchmarks/bench_server.py", "--checkpoint", str(ckpt), "--slots", "1",
                              "--clients", "1", "--startup-timeout", "600", "--figures", str(figures),
                              "--server-log", str(log)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**os.environ, **env})
        took = time.monotonic() - t0
        assert run.returncode == 1 and took < 300, (name, took, run.stdout[-2000:], run.stderr[-3000:])
        (line,) = [json.loads(x) for x in figures.read_text().splitlines()]
        assert line["figure"] == "error" and line["server_log"] == str(log), line
        if name == "exits":
            assert "the server exited with code" in line["error"]
        else:  # today the engine thread dies; a server that exits non-zero on a failed warm-up is as good
            assert "injected warm-up failure" in log.read_text()
            assert "a thread of the server died" in line["error"] or "the server exited with code" in line["error"]
        assert line["error"] in run.stderr.replace("error: ", "", 1)


@pytest.mark.slow
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
    from frame_ops import parse_hlo
    from trace_events import kernel_name

    def f(x, w):
        with jax.named_scope("depth_decoder"), jax.named_scope("transformer"):
            y = jnp.tanh(x @ w)
        with jax.named_scope("sampling"):
            return jnp.argmax(y, -1)

    hlo = jax.jit(f).lower(jnp.ones((4, 8)), jnp.ones((8, 2051))).compile().as_text()
    _, instrs, _ = parse_hlo(hlo)
    layer = next(n for n, i in instrs.items() if i.computation.startswith("main") and "transformer" in i.op_name
                 and i.opcode in ("fusion", "dot", "custom-call"))
    argmax = next(n for n, i in instrs.items() if i.computation.startswith("main") and "sampling" in i.op_name
                  and i.opcode == "fusion")
    (tmp_path / "frame_hlo.txt").write_text(hlo)
    names = ["kernel_of_the_matmul", kernel_name(argmax), "MemcpyD2H", "sm90_xmma_gemm", "other", "dup", "thunk"]
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
    stream = [("kernel_of_the_matmul", 10, {"hlo_op": layer} | module), (kernel_name(argmax), 3, {}),
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
