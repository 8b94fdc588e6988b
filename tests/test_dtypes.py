"""Checkpoints saved in bfloat16 or float16 work everywhere: the loaders, the generator, the scripts, the server.

The session's fp32 checkpoints (`csm_dir`: transformers' layout with Mimi inside; `mimi_files`) are rounded
to bf16 or fp16 by torch and saved in that dtype, in both CSM layouts. References are the same weights rounded
the same way but kept in fp32: a half file loaded in fp32 must give exactly their parameters, hence exactly
their greedy codes, and Mimi must match moshi run on the rounded weights.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from csm_jax.testing.inputs import speech_like
from csm_jax.testing.random_mimi import rounded_copy
from csm_jax.testing.tiny_csm import hf_to_sesame_tensors, tiny_hf_config

ROOT = Path(__file__).resolve().parents[1]
TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16}
TEXT = "Hello there."
GREEDY = dict(temperature=0.0, max_audio_ms=480)  # 6 frames


def _copy_side_files(src: Path, dst: Path, names=("config.json", "tokenizer.json")):
    dst.mkdir(parents=True)
    for name in names:
        shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def half(csm_dir, mimi_files, tmp_path_factory):
    """Folders and files holding the session's weights rounded to bf16 / fp16:
    hf_DT (transformers' layout, Mimi inside as codec_model.*), ses_DT (Sesame's layout, no Mimi),
    mimi_DT (Kyutai's Mimi file), all stored in DT; ref_bfloat16: Sesame's layout in fp32 of bf16-rounded values."""
    root = tmp_path_factory.mktemp("half")
    sd = load_file(str(csm_dir / "model.safetensors"))
    # transformers stores the tied audio embedding once, under the depth decoder's name; Sesame's file has it.
    audio = "backbone_model.embed_tokens.embed_audio_tokens.weight"
    sesame = hf_to_sesame_tensors({audio: sd.get(audio, sd.get("depth_decoder.model.embed_tokens.weight")), **sd},
                                  tiny_hf_config())
    sesame = {k: torch.from_numpy(v) for k, v in sesame.items()}
    ses_config = tiny_hf_config().to_dict()
    ses_config.pop("codec_config", None)
    mimi = load_file(str(mimi_files["moshi_path"]))
    out = {}
    for name, dt in TORCH.items():
        hf = root / f"hf_{name}"
        _copy_side_files(csm_dir, hf)
        save_file({k: v.to(dt) for k, v in sd.items()}, str(hf / "model.safetensors"), metadata={"format": "pt"})
        # Sesame's layout is a lossless re-arrangement, so rounding before or after it gives the same values.
        ses = root / f"ses_{name}"
        _copy_side_files(csm_dir, ses, ("tokenizer.json",))
        (ses / "config.json").write_text(json.dumps(ses_config))
        save_file({k: v.to(dt) for k, v in sesame.items()}, str(ses / "model.safetensors"))
        if name == "bfloat16":
            ref = root / "ref_bfloat16"
            _copy_side_files(csm_dir, ref, ("tokenizer.json",))
            (ref / "config.json").write_text(json.dumps(ses_config))
            save_file({k: v.to(dt).float() for k, v in sesame.items()}, str(ref / "model.safetensors"))
            out["ref_bfloat16"] = ref
        mimi_path = root / f"mimi_{name}.safetensors"
        save_file({k: v.to(dt) for k, v in mimi.items()}, str(mimi_path))
        out.update({f"hf_{name}": hf, f"ses_{name}": ses, f"mimi_{name}": mimi_path})
    assert {str(v.dtype) for v in load_file(str(out["hf_bfloat16"] / "model.safetensors")).values()} == \
        {"torch.bfloat16"}
    return out


def _rounded(tree, name):
    """Our fp32 parameters rounded to bf16/fp16 by torch, back in fp32: what a half file must load as."""
    return jax.tree.map(lambda x: torch.from_numpy(np.asarray(x)).to(TORCH[name]).float().numpy(), tree)


@pytest.fixture(scope="module")
def fp32_csm(csm_dir):
    from csm_jax.checkpoints import load_csm

    return load_csm(csm_dir, "float32")


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert np.asarray(x).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "ses"])
@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_csm_loads_half_files_exactly(half, fp32_csm, layout, name):
    from csm_jax.checkpoints import load_csm

    ck = load_csm(half[f"{layout}_{name}"])  # auto = float32 on CPU
    _assert_trees_equal(ck.params, _rounded(fp32_csm.params, name))
    if layout == "hf":  # the Mimi inside is handed on as stored; Mimi's loader casts it
        assert {v.dtype.name for v in ck.codec_tensors.values()} == {name}
    if name == "bfloat16":  # asked for bf16: the stored values, unchanged
        ck16 = load_csm(half[f"{layout}_{name}"], "bfloat16")
        for x, y in zip(jax.tree.leaves(ck16.params), jax.tree.leaves(ck.params)):
            assert x.dtype == jax.numpy.bfloat16
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y))


def test_bad_dtype_is_a_clear_error(half):
    from csm_jax.checkpoints import load_csm
    from csm_jax.mimi import load_mimi

    with pytest.raises(ValueError, match="csm cannot compute in float16: use one of auto, float32, bfloat16"):
        load_csm(half["ses_float16"], "float16")
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_mimi(half["mimi_float16"], "fp8")


def test_convert_ckpt_keeps_bf16(half, fp32_csm, tmp_path, capsys):
    """Sesame's ckpt.pt saved in bf16 converts to a bf16 safetensors that loads like the rounded weights."""
    from csm_jax.commands import convert

    torch.save(load_file(str(half["ses_bfloat16"] / "model.safetensors")), tmp_path / "ckpt.pt")
    out = tmp_path / "converted"
    out.mkdir()
    shutil.copy(half["ses_bfloat16"] / "config.json", out / "config.json")
    convert.main(convert.Args(tmp_path / "ckpt.pt", out))
    assert "tensors, bfloat16)" in capsys.readouterr().out
    from csm_jax.checkpoints import load_csm

    _assert_trees_equal(load_csm(out).params, _rounded(fp32_csm.params, "bfloat16"))


# ------------------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def refs(half, fp32_csm, csm_dir):
    """Per dtype: the greedy codes of the reference (the rounded weights held in fp32; for bf16 as read from
    the fp32 file) and the audio the half file's Mimi decodes them to. Generators are dropped after use."""
    from csm_jax.checkpoints import load_csm
    from csm_jax.generate import Generator
    from csm_jax.mimi import load_mimi

    out = {}
    for name, mimi in (("bfloat16", half["hf_bfloat16"]), ("float16", half["mimi_float16"])):
        if name == "bfloat16":
            ck = load_csm(half["ref_bfloat16"])  # saved in fp32
            cfg, params = ck.config, ck.params
        else:
            cfg, params = fp32_csm.config, _rounded(fp32_csm.params, name)
        gen = Generator.from_parts(cfg, params, load_mimi(mimi)[1], str(csm_dir / "tokenizer.json"),
                                   frames_per_call=4)
        codes = gen.generate_codes([TEXT], **GREEDY)[0]
        out[name] = codes, gen.model.decode_codes(codes)
        del gen, params
    return out


@pytest.mark.parametrize("which", ["hf_bfloat16", "ses_float16"])
def test_greedy_codes_and_stream_from_half_files(half, refs, which):
    from csm_jax.generate import Generator

    # As users make them: Mimi from codec_model.* (bf16) or from a Kyutai-layout file given as `mimi` (fp16).
    mimi = str(half["mimi_float16"]) if which.startswith("ses") else None
    gen = Generator(str(half[which]), mimi=mimi, frames_per_call=4)
    want_codes, want_audio = refs[which.split("_")[1]]
    codes = gen.generate_codes([TEXT], **GREEDY)[0]
    assert codes.shape == (32, 6)
    np.testing.assert_array_equal(codes, want_codes)  # identical codes, not close ones
    chunks = list(gen.stream(TEXT, **GREEDY))
    assert len(chunks) >= 2 and all(c.dtype == np.float32 for c in chunks)
    # The half file's Mimi in fp32 holds exactly the rounded values: streaming == one-shot up to fp32 noise.
    got = np.concatenate(chunks)
    assert got.shape == want_audio.shape and np.abs(got - want_audio).max() <= 1e-5 * np.abs(want_audio).max()


def _pcm16_close(read, want, rel):
    """A 16-bit WAV read back matches `want` within `rel` of its peak: the written sample is within one step of
    x * 32767 (libsndfile truncates here) and is read back as n / 32768, so it may move by (1 + |x|) / 32767."""
    want = np.clip(want, -1, 1)
    return bool(np.all(np.abs(read - want) <= (1 + np.abs(want)) / 32767 + rel * np.abs(want).max()))


def _run(script, *args, **kw):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=900, **kw)


@pytest.mark.slow
def test_synthesize_process_on_bf16_checkpoint(half, refs, tmp_path):
    out = tmp_path / "hello.wav"
    r = _run("synthesize.py", "--checkpoint", half["hf_bfloat16"], "--text", TEXT, "--out", out, "--temperature", 0,
             "--max-audio-ms", 480, "--frames-per-call", 4, "--save-codes", umask=0o027)
    assert r.returncode == 0, r.stderr
    want_codes, want = refs["bfloat16"]
    np.testing.assert_array_equal(np.load(out.with_suffix(".npy")), want_codes)
    y, sr = sf.read(out, dtype="float32")
    assert sr == 24000 and _pcm16_close(y, want, 1e-5)
    for f in (out, out.with_suffix(".npy")):  # the usual permissions: 0666 & ~umask
        assert f.stat().st_mode & 0o777 == 0o640, oct(f.stat().st_mode)


def test_offline_sesame_folder_needs_mimi(half, tmp_path):
    """Offline with an empty hub cache, a Sesame-layout folder (no Mimi inside) fails in one line naming --mimi."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    r = _run("synthesize.py", "--checkpoint", half["ses_float16"], "--text", TEXT, "--out", tmp_path / "a.wav",
             env=env)
    assert r.returncode == 2 and "holds no Mimi weights" in r.stderr and "(--mimi)" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "a.wav").exists()


@pytest.mark.slow
def test_failure_after_generation_keeps_the_codes(half, refs, mimi_files, tmp_path, monkeypatch, capsys):
    """synthesize.py on fp16 Sesame-layout files; decoding fails after generation: the codes are saved, the error
    is one line naming them, and the command it suggests decodes them (codec.py as a process)."""
    from csm_jax.bundle import ModelBundle
    from csm_jax.commands import synthesize

    def broken(self, codes):
        raise RuntimeError("the accelerator went away\nsecond line of a long report")

    monkeypatch.setattr(ModelBundle, "decode_codes", broken)
    out = tmp_path / "a.wav"
    args = synthesize.Args(text=[TEXT], out=out, temperature=0.0, max_audio_ms=480, frames_per_call=4,
                           checkpoint=str(half["ses_float16"]), mimi=str(half["mimi_float16"]))
    with pytest.raises(SystemExit) as e:
        synthesize.main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    npy = tmp_path / "a.npy"
    assert err.startswith("error: utterance 0 was generated, but decoding or writing") and str(npy) in err
    assert "RuntimeError: the accelerator went away)" in err and "second line" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy"]  # no WAV, no temporary file
    codes = np.load(npy)
    np.testing.assert_array_equal(codes, refs["float16"][0])

    command = err.split("`")[1].split()
    assert command[:4] == ["python", "scripts/codec.py", "decode", str(npy)]
    r = _run("codec.py", *command[2:])
    assert r.returncode == 0, r.stderr
    y, sr = sf.read(out, dtype="float32")
    with torch.no_grad():
        want = rounded_copy(mimi_files["moshi_model"], torch.float16).decode(
            torch.from_numpy(codes[None].astype(np.int64))).numpy()[0, 0]
    assert sr == 24000 and _pcm16_close(y, want, 1e-4)  # our fp32 audio tolerance against moshi


def test_codec_encode_process_on_bf16_codec_model(half, mimi_files, tmp_path):
    """scripts/codec.py encode with a transformers CSM checkpoint saved in bf16: its codec_model.* part is Mimi."""
    x = speech_like(24000, seed=5)
    sf.write(tmp_path / "in.wav", x, 24000, subtype="FLOAT")
    r = _run("codec.py", "encode", tmp_path / "in.wav", tmp_path / "codes.npy", "--checkpoint", half["hf_bfloat16"])
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        want = rounded_copy(mimi_files["moshi_model"], torch.bfloat16).encode(torch.from_numpy(x)[None, None])
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), want.numpy()[0])


# ------------------------------------------------------------------------------------------------------ Mimi


@pytest.mark.slow
def test_mimi_from_bf16_files(half, mimi_files):
    """Mimi in fp32 from a bf16 file (Kyutai's layout and transformers' codec_model.*) is moshi on the rounded
    weights, and within bf16 rounding of the fp32 file; Mimi asked to compute in bf16 works one-shot and
    streaming, within bf16 compute error."""
    import jax.numpy as jnp

    from csm_jax.mimi import decode, decode_step, encode_step, init_decoder_state, init_encoder_state, load_mimi

    codes = np.random.default_rng(6).integers(0, 2048, (1, 32, 10), dtype=np.int32)  # any codes decode
    _, p32 = load_mimi(mimi_files["moshi_path"])
    y32 = np.asarray(decode(p32, codes))[0]
    peak = np.abs(y32).max()
    with torch.no_grad():
        ref = rounded_copy(mimi_files["moshi_model"], torch.bfloat16).decode(
            torch.from_numpy(codes.astype(np.int64))).numpy()[0, 0]
    for source in (half["mimi_bfloat16"], half["hf_bfloat16"]):
        _, p = load_mimi(source)
        assert {v.dtype for v in jax.tree.leaves(p)} == {np.dtype(np.float32)}
        y = np.asarray(decode(p, codes))[0]
        assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()  # our fp32 audio tolerance against moshi
        # Each weight moved by at most 2^-9 of itself (bf16 keeps 8 significant bits). Those independent
        # relative errors add up through the network to the same order in the audio: 2.2e-3 of peak measured
        # here (1.1 * 2^-9); the bound is 4 * 2^-9. (Any extra rounding, such as codebooks divided in bf16,
        # fails the comparison with moshi above.)
        assert np.abs(y - y32).max() <= 4 * 2.0 ** -9 * peak

    _, pb = load_mimi(half["hf_bfloat16"], "bfloat16")
    assert {v.dtype for v in jax.tree.leaves(pb)} == {jnp.dtype(jnp.bfloat16)}
    yb = np.asarray(decode(pb, codes))[0]
    assert yb.dtype == np.float32
    # In bf16 every activation is rounded too, by up to 2^-9, at each of the decoder's ~60 convolutions and
    # matmuls: 7.5e-3 of peak measured (3.9 * 2^-9; RMS 1.7 * 2^-9 of the signal's); bounds 16 * 2^-9 of peak
    # and 4 * 2^-9 RMS.
    assert np.abs(yb - y32).max() <= 16 * 2.0 ** -9 * peak
    assert np.sqrt(np.mean((yb - y32) ** 2)) <= 4 * 2.0 ** -9 * np.sqrt(np.mean(y32 ** 2))
    st = init_decoder_state(pb, 1)
    assert {v.dtype for v in jax.tree.leaves(st) if jnp.issubdtype(v.dtype, jnp.floating)} == {jnp.dtype(jnp.bfloat16)}
    chunks = []
    for t in range(codes.shape[2]):
        st, pcm = decode_step(pb, st, codes[:, :, t])
        chunks.append(np.asarray(pcm)[0])
    ys = np.concatenate(chunks)
    assert ys.dtype == np.float32 and np.abs(ys - y32).max() <= 16 * 2.0 ** -9 * peak
    st = init_encoder_state(pb, 1)  # the encoder's streaming state follows the parameters too
    st, frame = encode_step(pb, st, jnp.asarray(speech_like(1920, seed=6)[None]))
    assert frame.shape == (1, 32) and st["down"].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------------- server


@pytest.mark.slow
def test_server_request_on_bf16_checkpoint(half, refs, tmp_path):
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint",
                             str(half["hf_bfloat16"]), "--port", str(port), "--slots", "1", "--no-warmup",
                             "--dtype", "float32"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proc.poll() is None, (log.seek(0), log.read())[1]
        r = httpx.post(url + "/v1/audio/speech", timeout=300,
                       json={"input": TEXT, "response_format": "pcm", "stream": False, **GREEDY})
        assert r.status_code == 200, r.text
        pcm = np.frombuffer(r.content, "<i2").astype(np.float32) / 32767
        want = np.clip(refs["bfloat16"][1], -1, 1)
        # int16 truncation (one step) plus fp32 streaming-vs-one-shot noise.
        assert pcm.shape == want.shape and np.abs(pcm - want).max() <= 1 / 32767 + 1e-5 * np.abs(want).max()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
