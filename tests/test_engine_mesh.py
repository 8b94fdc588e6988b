"""The engine and Generator on a mesh of every local device equal one device (csm_jax.bundle, csm_jax.engine).

As tests/test_sharding.py: a child process on 8 forced CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
runs a batch and an engine with staggered admissions on the mesh (slots split along "data") and saves what they
made; this process runs the same on its one device (a Generator without a mesh: the reference) meanwhile, so the
rest of the suite keeps one device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here takes tens of seconds on 2 cores

TEXTS = ["Hello there.", "How are you today?", "A third one.", "Four.", "And the fifth text."]
FRAMES_PER_CALL = 4
BATCH = dict(speakers=[0, 1, 0, 1, 0], seeds=[11, 12, 13, 14, 15], max_audio_ms=400)  # five frames each
# Requests admitted at different steps: one running alone, one inserted into the busy batch a step later, two
# admitted together at the next step; different lengths, so they finish at different steps.
STAGGERED = [(0, dict(text=TEXTS[0], seed=1, max_audio_ms=960)),
             (1, dict(text=TEXTS[1], speaker=1, seed=2, max_audio_ms=480)),
             (2, dict(text=TEXTS[2], seed=3, temperature=0.0, max_audio_ms=320)),
             (2, dict(text=TEXTS[4], seed=4, max_audio_ms=400))]


def _batches(gen, compiles: list | None = None) -> dict:
    """(audio, codes) of each text of a batch of five (eight slots on the mesh, three idle), greedy and sampled.
    `compiles`: the compilations of the sampled run (the greedy one ran the same programs) are counted in it."""
    import jax

    out = {"greedy": gen.generate(TEXTS, temperature=0.0, return_codes=True, **BATCH)}
    counting = [compiles is not None]

    def listener(event, duration, **kw):
        if counting[0] and event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    if compiles is not None:  # in the child only: listeners cannot be unregistered one by one
        jax.monitoring.register_event_duration_secs_listener(listener)
    out["sampled"] = gen.generate(TEXTS, temperature=0.9, return_codes=True, **BATCH)
    counting[0] = False
    return out


def _staggered(gen):
    """(audio, codes) of each STAGGERED request on one engine of eight slots, and the engine."""
    from csm_jax.engine import Engine
    from csm_jax.request import Request

    engine = Engine(gen.model, slots=8, frames_per_call=FRAMES_PER_CALL)
    reqs = [(step, Request(**kw)) for step, kw in STAGGERED]
    got = {id(r): ([], []) for _, r in reqs}
    step = 0
    while step <= reqs[-1][0] or engine.busy():
        for _, r in (x for x in reqs if x[0] == step):
            assert engine.submit(r) is not None
        for ev in engine.step().values():
            got[id(ev.owner)][0].append(ev.audio)
            got[id(ev.owner)][1].append(ev.codes)
        step += 1
    return [(np.concatenate(got[id(r)][0]), np.concatenate(got[id(r)][1]).T) for _, r in reqs], engine


def _alone(gen, r):
    return gen.generate(r.text, speakers=r.speaker, seeds=r.seed, temperature=r.temperature, topk=r.topk,
                        max_audio_ms=r.max_audio_ms, return_codes=True)


def _child(checkpoint: str, result: str) -> None:
    import jax

    from csm_jax import sharding
    from csm_jax.engine import Engine
    from csm_jax.generate import Generator

    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh(devices=jax.local_devices())
    gen = Generator(checkpoint, frames_per_call=FRAMES_PER_CALL, mesh=mesh)
    compiles = []
    runs = _batches(gen, compiles)
    runs["staggered"], engine = _staggered(gen)
    arrays = {f"{name}/{i}/{what}": x for name, pairs in runs.items() for i, pair in enumerate(pairs)
              for what, x in zip(("audio", "codes"), pair)}
    # the state really is split: each device holds its own slot of every field; the parameters whole
    shards = {"k": engine.state.cache["k"][0], "key": engine.state.key, "done": engine.state.done,
              "mimi": jax.tree.leaves(engine.mimi_state)[0], "wo": gen.model.params["backbone"]["layers"][0]["wo"]}
    info = {"mesh": dict(mesh.shape), "compiles_second_batch": len(compiles),
            "shards": {n: [list(a.shape), list(a.sharding.shard_shape(a.shape)), len(a.sharding.device_set)]
                       for n, a in shards.items()}}
    try:  # a slot count that the mesh cannot split
        Engine(gen.model, slots=4)
    except ValueError as e:
        info["slots4"] = str(e)
    np.savez(result, info=json.dumps(info), **arrays)


def test_engine_and_generator_on_a_mesh_equal_one_device(csm_dir, tmp_path):
    from csm_jax.request import Request
    from csm_jax.generate import Generator

    result = tmp_path / "mesh.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    log = open(tmp_path / "child.log", "w+")
    child = subprocess.Popen([sys.executable, __file__, str(csm_dir), str(result)], stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    try:  # the reference, on this process's one device, while the child runs: the batch, and each request alone
        one = Generator(str(csm_dir), frames_per_call=FRAMES_PER_CALL)
        ref = _batches(one)
        ref["staggered"] = [_alone(one, Request(**kw)) for _, kw in STAGGERED]
    finally:
        child.wait(timeout=900)
        log.seek(0)
        output = log.read()
        log.close()
    assert child.returncode == 0, output[-3000:]
    got = np.load(result)
    info = json.loads(str(got["info"]))
    assert info["mesh"] == {"data": 8, "model": 1}
    # a second batch on a fresh engine compiles nothing: every program returns its state split as it came in
    assert info["compiles_second_batch"] == 0
    # codes identical, audio equal within fp32 rounding; the runs are not degenerate (frames made, rows differ)
    for name in ("greedy", "sampled", "staggered"):
        codes = [c for _, c in ref[name]]
        assert min(c.shape[1] for c in codes) >= 3 and len({c.tobytes() for c in codes}) == len(codes), name
        for i, (audio, c) in enumerate(ref[name]):
            np.testing.assert_array_equal(got[f"{name}/{i}/codes"], c, err_msg=f"{name} {i}")
            mesh_audio = got[f"{name}/{i}/audio"]
            assert mesh_audio.shape == audio.shape, (name, i)
            assert np.abs(mesh_audio - audio).max() <= 1e-5 * np.abs(audio).max(), (name, i)
    # one slot per device for the cache, the PRNG keys, the flags and Mimi's state; parameters replicated
    for name in ("k", "key", "done", "mimi"):
        shape, shard, devices = info["shards"][name]
        assert shape[0] == 8 and shard == [1] + shape[1:] and devices == 8, (name, info["shards"][name])
    shape, shard, devices = info["shards"]["wo"]
    assert shard == shape and devices == 8
    assert "multiple of 8 slots" in info["slots4"], info["slots4"]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _child(sys.argv[1], sys.argv[2])
