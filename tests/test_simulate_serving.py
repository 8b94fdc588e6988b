"""The serving simulation (benchmarks/simulate_serving.py: the real driver, engine and schedule on a fake clock,
the device a cost model) gives the figures worked out by hand for cases simple enough to work out: every
generation step taking the same time, prefill free; and its cost model computes what its docstring says from
the H100 table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import simulate_serving as sim  # noqa: E402


def run(arrivals, **kw):
    return sim.simulate(sim.Args(**kw), arrivals)


def test_requests_arriving_together_get_the_hand_derived_figures():
    """64 requests at t = 0 on 64 slots, 32 prompt rows each, at most 512 prompt rows a step, every generation
    step c = 0.2 s, prefill free, 960 ms (12 frames) each, 4 frames a step.

    Admission: no stream has audio before the first results are read, and once they have, the schedule has no
    step-time estimate yet (every step so far prefilled, so none measured a plain generation step): each of the
    first four steps admits as many prompts as 512 rows hold, 512 / 32 = 16 (one length class of one 32-row
    piece), prefilled as two groups of 8 (groups are of 64, 8 or 1 requests): 8 prefill calls in all.
    Time: step k (k = 1, 2, ...) dispatches generation G_k, which runs after G_(k-1) and ends at k x c, then
    reads G_(k-1)'s results, waiting until (k-1) x c. The 16 admitted at step k first generate in G_k, read at
    step k+1, at k x c: first audio 0.2, 0.4, 0.6, 0.8 s for 16 requests each. numpy's p50 of the 64 lies
    halfway between the 32nd (0.4) and the 33rd (0.6): 0.5; p95 at rank 0.95 x 63 = 59.85, among the last 16:
    0.8; max 0.8.
    Streams: a request's 12 frames come in G_k, G_(k+1), G_(k+2), 0.32 s each at k c, (k+1) c, (k+2) c: the next
    chunk always comes 0.2 s after the last, before its 0.32 s have played. No stall: 64 real-time streams.
    Steps: G_6 makes the last group's last frames and says they are done; step 7 still runs them (G_7,
    dispatched before G_6 was read, all rows finished) and reads G_6; step 8 dispatches nothing and reads G_7,
    at 7 c = 1.4 s: 8 steps. G_4 runs all 64 slots (group 1's end is read only at step 4)."""
    r = run([0.0] * 64, slots=64, prefill_rows=512, prompt_rows=32, max_audio_ms=960, step_s=0.2)
    assert (r["first_audio_p50_s"], r["first_audio_p95_s"], r["first_audio_max_s"]) == pytest.approx((0.5, 0.8, 0.8))
    assert (r["realtime_streams"], r["stall_s"], r["short"]) == (64, pytest.approx(0.0), 0)
    assert (r["steps"], r["prefill_calls"], r["simulated_s"], r["max_generating"]) == (8, 8, pytest.approx(1.4), 64)
    assert r["device_busy"] == pytest.approx(1.0) and r["deferrals"] == 0


def test_one_request_stalls_when_a_step_takes_longer_than_its_audio():
    """One request of 960 ms (3 steps of 4 frames, 0.32 s each) with c = 0.4 s a step: its chunks are read at
    0.4, 0.8 and 1.2 s. Played from 0.4, its audio runs out at 0.72, 0.08 s before the second chunk, and again
    at 1.12, 0.08 s before the third: 0.16 s of stall, not real time. Steps: G_1..G_3 make its frames, G_4 runs
    it finished and is read at step 5, at 1.6 s; one prefill call (a group of 1)."""
    r = run([0.0], slots=4, max_audio_ms=960, step_s=0.4)
    assert (r["first_audio_p50_s"], r["first_audio_max_s"], r["stall_s"]) == pytest.approx((0.4, 0.4, 0.16))
    assert (r["realtime_streams"], r["short"], r["steps"], r["prefill_calls"]) == (0, 0, 5, 1)
    assert r["simulated_s"] == pytest.approx(1.6)


def test_a_playback_buffer_absorbs_the_stalls_it_covers():
    """The same request played from a buffer after its first audio (bench_server.py's real-time count): with
    100 ms, playback runs 0.5 .. 0.82; the second chunk comes at 0.8, in time; the audio then lasts until 1.14,
    the third comes at 1.2: 0.06 s of stall, not real time. With 200 ms, 0.6 .. 0.92, then until 1.24, after the
    third chunk came at 1.2: no stall, real time. First audio stays 0.4 s either way."""
    for buffer_ms, stall, realtime in ((100, 0.06, 0), (200, 0.0, 1)):
        r = run([0.0], slots=4, max_audio_ms=960, step_s=0.4, start_buffer_ms=buffer_ms)
        assert (r["first_audio_p50_s"], r["stall_s"]) == pytest.approx((0.4, stall), abs=1e-9), buffer_ms
        assert r["realtime_streams"] == realtime, buffer_ms


def test_requests_far_apart_are_each_served_as_alone():
    """Requests at 0 and 5 s, c = 0.2 s, 960 ms each: each is served alone (first audio c = 0.2 s after its
    arrival, its steps over 0.8 s after it, 5 steps each); the device idles in between: the run ends at 5.8 s,
    busy 2 x 4 steps x 0.2 s of it."""
    r = run([0.0, 5.0], slots=4, max_audio_ms=960, step_s=0.2)
    assert (r["first_audio_p50_s"], r["first_audio_max_s"]) == pytest.approx((0.2, 0.2))
    assert (r["realtime_streams"], r["steps"], r["prefill_calls"]) == (2, 10, 2)
    assert (r["simulated_s"], r["device_busy"]) == pytest.approx((5.8, 1.6 / 5.8))


def test_the_h100_cost_model_is_the_tables():
    """csm-1b's backbone: 16 layers of wqkv 3072 x 2048, wo 2048 x 2048, w13 16384 x 2048 and w2 2048 x 8192,
    16 x 60,817,408 = 973,078,528 weights. A prefill call of 64 x 32 rows: 2 x 973,078,528 x 2,048 FLOPs at
    400 TFLOP/s, 9.964 ms; of 32 rows: reading 2 x 973,078,528 bytes at 2,108 GB/s, 0.9232 ms, is longer
    than its 0.156 ms of matmuls. A 4-frame step at 256 rows: 4 x (18.40 + 8.4) = 107.2 ms; at 640, beyond the
    tables: frame 23.33 + 128 x (23.33 - 18.40) / 256 = 25.795, Mimi 8.4 + 384 x (8.4 - 4.2) / 192 = 16.8,
    4 x 42.595 = 170.38 ms."""
    assert sim.backbone_weights() == 973_078_528
    step_s, prefill_s, name = sim.cost_model(sim.Args())
    assert name.startswith("H100")
    assert prefill_s(2048) == pytest.approx(2 * 973_078_528 * 2048 / 400e12, rel=1e-12)
    assert prefill_s(2048) == pytest.approx(9.964e-3, abs=1e-6) and prefill_s(32) == pytest.approx(0.9232e-3, abs=1e-7)
    assert (step_s(256), step_s(640)) == pytest.approx((0.1072, 0.17038), rel=1e-9)


def test_the_command_prints_its_figures_and_ends_with_one_json_line(tmp_path):
    """The command on the H100 model (small), and with a table of its own; the H200 has no figures yet."""
    table = tmp_path / "device.json"
    table.write_text(json.dumps({"frame_ms": [[1, 20.0], [64, 20.0]], "mimi_ms": [[1, 5.0], [64, 5.0]],
                                 "read_gbs": 1000.0, "prefill_tflops": 100.0}))
    for extra, model in (([], "H100"), (["--table", str(table)], str(table))):
        out = subprocess.run([sys.executable, "benchmarks/simulate_serving.py", "--slots", "64", "--at-once", "8",
                              "--poisson", "20", "--seconds", "1", *extra],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        lines = out.stdout.strip().splitlines()
        result = json.loads(lines[-1])
        assert result["cost_model"].startswith(model) and result["slots"] == 64
        assert [s["scenario"] for s in result["scenarios"]] == ["8 at once", "Poisson 20/s"]
        assert result["scenarios"][0]["requests"] == 8 and result["scenarios"][0]["short"] == 0
        assert any(line.startswith("8 at once") for line in lines)
    # The table's model: a 4-frame step costs 4 x 25 ms at any rows.
    assert result["step_ms"] == pytest.approx({"1": 100.0, "8": 100.0, "64": 100.0})
    out = subprocess.run([sys.executable, "benchmarks/simulate_serving.py", "--device", "h200"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "not measured" in out.stderr and "--table" in out.stderr


def test_an_engine_refuses_programs_made_for_other_shapes():
    from csm_jax.engine import Engine
    from csm_jax.testing.stub_device import FakeClock, StubDevice, StubModel

    with pytest.raises(ValueError, match="made for 8 slots and 4 frames per call, the engine has 4 and 4"):
        Engine(StubModel(), slots=4, frames_per_call=4, programs=StubDevice(8, 4, FakeClock()))
