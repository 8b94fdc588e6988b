"""Training across hosts: two CPU processes joined by jax.distributed (one device each, as two hosts would
be) train the same steps as one process on two forced devices, and end with the same losses and parameters.

Each run is this file run as a script (`run OUT`): csm_jax.train.trainer.fit on the narrow tiny model and
random examples of tests/test_train_sharding.py, FSDP on (so parameters and optimizer state are split across
the processes), a checkpoint at the end (orbax writing from both processes). It saves the losses and the
trained parameters (gathered from all processes) to OUT/result-<process>.npz. Differences are
max |a - b| over the leaves relative to max |b| (b: the one-process run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here takes tens of seconds on 2 cores

HERE = Path(__file__).resolve().parent
TOL = 1e-5
STEPS = 2


def _run(out: Path) -> None:
    from csm_jax import distributed

    distributed.initialize(cross_process_collectives=True)  # before anything touches a device
    import jax

    from csm_jax import csm
    from csm_jax.train.placement import host_values
    from csm_jax.train.trainer import RunOptions, fit

    sys.path.insert(0, str(HERE))
    from test_train_sharding import _cfg, _rows, _tc

    assert jax.device_count() == 2, jax.devices()
    cfg = _cfg()
    params = csm.init_params(cfg, jax.random.key(0))
    run = RunOptions(out_dir=out, progress=False, eval_every=2, checkpoint_every=0, keep=1, fsdp=True)
    trainable, _, history = fit(cfg, params, _rows(16), _rows(8, seed=3), _tc(steps=STEPS), run, log=lambda s: None)
    flat = jax.tree_util.tree_flatten_with_path(host_values(trainable))[0]
    np.savez(out / f"result-{jax.process_index()}.npz", loss=np.array([h["loss"] for h in history]),
             eval_loss=np.array([h.get("eval_loss", np.nan) for h in history]),
             **{jax.tree_util.keystr(p): np.asarray(v) for p, v in flat})
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "local_devices": jax.local_device_count(), "steps": len(history)}))


def _rel(a: dict, b: dict, keys) -> float:
    return (max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in keys)
            / max(float(np.abs(b[k].astype(np.float64)).max()) for k in keys))


def test_two_processes_train_as_one_process_on_two_devices(tmp_path):
    from test_multihost import cluster_env, env, free_port

    me = [sys.executable, str(Path(__file__).resolve()), "run"]
    # The one-process reference runs beside the two processes (they share no files): each of the three spends
    # most of its time compiling, so together they take less time than one after the other.
    port = free_port()
    one = env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    ref = subprocess.Popen(me + [str(tmp_path / "one")], env=one, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    procs = [subprocess.Popen(me + [str(tmp_path / "two")], env=cluster_env(port, 2, i), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
        ref_err = ref.communicate(timeout=600)[1]
    finally:
        for p in (ref, *procs):
            if p.poll() is None:
                p.kill()
    assert ref.returncode == 0, ref_err[-3000:]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    said = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert [(s["process"], s["processes"], s["local_devices"], s["steps"]) for s in said] == [
        (0, 2, 1, STEPS), (1, 2, 1, STEPS)]
    one = dict(np.load(tmp_path / "one" / "result-0.npz"))
    two = [dict(np.load(tmp_path / "two" / f"result-{i}.npz")) for i in range(2)]
    params = [k for k in one if k not in ("loss", "eval_loss")]
    assert params and all(sorted(t) == sorted(one) for t in two)
    for t in two:  # both processes hold the same result, and it is the one-process one
        assert _rel(t, one, ["loss"]) < TOL, (t["loss"], one["loss"])
        assert np.isnan(one["eval_loss"][0]) and np.isfinite(one["eval_loss"][1])  # eval at the last step only
        assert abs(t["eval_loss"][1] - one["eval_loss"][1]) / abs(one["eval_loss"][1]) < TOL
        assert _rel(t, one, params) < TOL
    # only process 0 wrote the metrics, one line per step; orbax wrote the final checkpoint once
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir() if p.name.isdigit()] == [str(STEPS)]


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        _run(Path(sys.argv[2]))
