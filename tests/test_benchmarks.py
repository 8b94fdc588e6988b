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
