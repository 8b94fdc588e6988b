"""A multi-host run on one machine: two CPU processes joined by jax.distributed, as two hosts would be."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csm_jax.distributed import plan

ROOT = Path(__file__).resolve().parents[1]
SYNTH = ROOT / "scripts" / "synthesize.py"
LINES = ["Hello there. A second sentence.", "Short one.", "The third line.", "And the fourth, last."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**kw) -> dict:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROC", "JAX_PROCESS",
                                                                  "SLURM_", "OMPI_", "CSM_JAX_DISTRIBUTED"))}
    e.update(JAX_PLATFORMS="cpu", **{k: str(v) for k, v in kw.items()})
    return e


def cluster_env(port: int, n: int, i: int, **kw) -> dict:
    return env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=n, JAX_PROCESS_ID=i, **kw)


def test_plan_reads_the_environment():
    assert plan({}) is None
    assert plan({"CSM_JAX_DISTRIBUTED": "0"}) is None
    assert plan({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        "cluster_detection_method": "deactivate"}
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
             "SLURM_LOCALID": "0"}
    assert plan(slurm) == {}  # JAX's own Slurm detection fills in everything
    assert plan({**slurm, "JAX_COORDINATOR_ADDRESS": "n1:1234"}) == {"coordinator_address": "n1:1234"}
    assert plan({**slurm, "SLURM_NTASKS": "1"}) is None  # one task: one process
    assert plan({**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None  # a step of one task in a larger allocation
    assert plan({k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None  # a batch script, no srun
    assert plan({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}) == {}
    assert plan({"CSM_JAX_DISTRIBUTED": "1"}) == {}  # e.g. a TPU slice: JAX detects the layout
    bad = [
        ({"JAX_PROCESS_ID": "1"}, "JAX_PROCESS_ID is set but JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are not"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID is not"),
        ({"JAX_COORDINATOR_ADDRESS": "h", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "host:port"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "integer >= 1"),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "ids run 0..1"),
        ({"CSM_JAX_DISTRIBUTED": "maybe"}, "CSM_JAX_DISTRIBUTED must be 1"),
    ]
    for e, msg in bad:
        with pytest.raises(ValueError, match=re.escape(msg)):
            plan(e)


@pytest.mark.slow
def test_two_processes_write_each_line_once_as_one_process_would(tmp_path, csm_dir):
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(LINES[:2] + [""] + LINES[2:]) + "\n")  # a blank line is skipped, not counted
    common = ["--checkpoint", csm_dir, "--text-file", text, "--batch-size", 2, "--max-audio-ms", 240,
              "--frames-per-call", 3, "--save-codes", "--seed", 5]
    # Compiled programs are shared through a cache of this test's own: process 0 loads what the reference
    # compiled (a fifth of the CPU time of compiling again; process 1's device has another id and compiles).
    cache = dict(JAX_COMPILATION_CACHE_DIR=tmp_path / "xla", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
    # The reference: one process, no distributed runtime, the same lines and seed.
    single = subprocess.run([sys.executable, SYNTH, *map(str, common), "--out-dir", str(tmp_path / "single")],
                            env=env(**cache), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    port = free_port()
    procs = [subprocess.Popen([sys.executable, SYNTH, *map(str, common), "--out-dir", str(tmp_path / "multi")],
                              env=cluster_env(port, 2, i, **cache), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    written = [sorted(int(m) for m in re.findall(r"(\d{3})\.wav: ", out)) for out, _ in outs]
    assert written == [[0, 2], [1, 3]]  # process p speaks lines i % 2 == p, each once
    assert "4 utterances" in outs[0][0] and "written by 2 processes" in outs[0][0]
    assert "written by" not in outs[1][0] and "written by" not in single.stdout
    names = sorted(p.name for p in (tmp_path / "multi").iterdir())
    manifests = ["manifest.process0.jsonl", "manifest.process1.jsonl"]  # one per process: no shared appends
    assert names == sorted([f"{i:03d}.{ext}" for i in range(4) for ext in ("npy", "wav")] + manifests)  # no temps
    for p, name in enumerate(manifests):
        lines = [json.loads(line) for line in (tmp_path / "multi" / name).read_text().splitlines()]
        assert lines[0]["utterances"] == 4 and [e["index"] for e in lines[1:]] == [p, p + 2]
    for i in range(4):
        np.testing.assert_array_equal(np.load(tmp_path / "multi" / f"{i:03d}.npy"),
                                      np.load(tmp_path / "single" / f"{i:03d}.npy"))
        a, sr = sf.read(tmp_path / "multi" / f"{i:03d}.wav", dtype="int16")
        b, _ = sf.read(tmp_path / "single" / f"{i:03d}.wav", dtype="int16")
        assert sr == 24000 and a.size > 0
        np.testing.assert_array_equal(a, b)
    # Rerun as one process: it reads both processes' manifests and finds nothing left to do.
    stamps = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "multi").iterdir()}
    again = subprocess.run([sys.executable, SYNTH, *map(str, common), "--out-dir", str(tmp_path / "multi")],
                           env=env(**cache), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "4 of 4 utterances are written already" in again.stderr, again.stderr
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "multi").iterdir()}
    assert [json.loads(line) for line in after.pop("manifest.jsonl")[0].decode().splitlines()] == \
        [json.loads((tmp_path / "multi" / manifests[0]).read_text().splitlines()[0])]  # its own: the job, nothing new
    assert after == stamps


def test_half_set_environment_fails_in_one_line(tmp_path):
    for extra, msg in [({"JAX_PROCESS_ID": 1}, "JAX_PROCESS_ID is set but JAX_COORDINATOR_ADDRESS and "
                                               "JAX_NUM_PROCESSES are not"),
                       ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": 2, "JAX_PROCESS_ID": 2},
                        "must be below JAX_NUM_PROCESSES=2"),
                       ({"CSM_JAX_DISTRIBUTED": 1}, "JAX found no layout to start from")]:
        e = {k: v for k, v in env(**extra).items() if k != "KUBERNETES_SERVICE_HOST"}  # no cluster to detect
        r = subprocess.run([sys.executable, SYNTH, "--checkpoint", "never/loaded", "--text", "hi",
                            "--out-dir", str(tmp_path / "o")], env=e, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().startswith("error: ") and msg in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


FAILING = """
import sys
from csm_jax import distributed
distributed.initialize()
import jax
if jax.process_index() == 1:
    distributed.report_failure("ValueError: no such voice")
    sys.exit(1)
try:
    distributed.gather("done", "x", timeout_s=120)
except RuntimeError as e:
    print(e)
    sys.exit(3)
"""


def test_a_failed_process_stops_the_others_waiting():
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FAILING], env=cluster_env(port, 2, i), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=100) for p in procs]  # well before the gather's 120 s timeout
    assert [p.returncode for p in procs] == [3, 1], outs
    assert "process 1 of 2 failed (ValueError: no such voice)" in outs[0][0], outs
