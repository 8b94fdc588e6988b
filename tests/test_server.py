"""The HTTP server as a user meets it: a real uvicorn process on a loopback port, a tiny random checkpoint,
a voices folder, concurrent clients, disconnects, a full queue and bad requests."""

import io
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from mimi_fixtures import speech_like

ROOT = Path(__file__).resolve().parents[1]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(csm_dir, tmp_path_factory, *extra):
    voices = tmp_path_factory.mktemp("voices")
    sf.write(voices / "alice.wav", speech_like(24000, seed=8), 24000)
    (voices / "alice.txt").write_text("Hello, I am Alice.")
    (voices / "alice.json").write_text('{"speaker": 1}')
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint", str(csm_dir),
                             "--voices-dir", str(voices), "--port", str(port), "--slots", "2", "--max-queue", "4",
                             *extra], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError("server exited:\n" + log.read())
        time.sleep(0.5)
    return proc, url


@pytest.fixture(scope="module")
def server(csm_dir, tmp_path_factory):
    proc, url = _start(csm_dir, tmp_path_factory)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_shutdown_ends_in_flight_streams(csm_dir, tmp_path_factory):
    proc, url = _start(csm_dir, tmp_path_factory)
    got = []

    def listen():
        try:
            with httpx.stream("POST", url + "/v1/audio/speech", timeout=120,
                              json={"input": "A very long answer.", "max_audio_ms": 60000}) as r:
                for chunk in r.iter_bytes():
                    got.append(len(chunk))
        except httpx.HTTPError as e:
            got.append(e)

    t = threading.Thread(target=listen)
    t.start()
    while not got:
        time.sleep(0.1)
    proc.terminate()  # SIGTERM: uvicorn waits up to 10 s for in-flight streams, then cancels them
    # uvicorn re-raises the signal after a clean shutdown, so the exit status is -SIGTERM (or 0 on older ones).
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    t.join(timeout=60)
    assert not t.is_alive()


def _speech(url, **body):
    body = {"model": "csm-1b", "input": "Hello there.", "voice": "alice", **body}
    return httpx.post(url + "/v1/audio/speech", json=body, timeout=300)


def _wav(content):
    # The streamed WAV header declares an open-ended size; read the PCM after the 44-byte header.
    assert content[:4] == b"RIFF" and content[8:12] == b"WAVE"
    return np.frombuffer(content[44:], "<i2")


def test_more_requests_than_slots_each_equal_alone(server):
    reqs = [dict(input=f"Request number {i}.", seed=i, max_audio_ms=640) for i in range(4)]
    results = [None] * 4

    def go(i):
        results[i] = _speech(server, **reqs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(results):
        assert r.status_code == 200, r.text
        pcm = _wav(r.content)
        assert 0 < len(pcm) <= 8 * 1920 and len(pcm) % 1920 == 0
        alone = _speech(server, **reqs[i], stream=False)
        assert alone.status_code == 200
        ref = _wav(alone.content)
        assert ref.shape == pcm.shape and np.abs(ref.astype(int) - pcm.astype(int)).max() <= 1


def test_formats(server):
    r = _speech(server, response_format="flac", max_audio_ms=320)
    assert r.status_code == 200
    audio, sr = sf.read(io.BytesIO(r.content))
    assert sr == 24000 and len(audio) > 0
    r = _speech(server, response_format="pcm", max_audio_ms=320)
    assert r.status_code == 200 and len(r.content) % (2 * 1920) == 0
    assert httpx.get(server + "/v1/models").json()["data"][0]["id"] == "csm-1b"


def test_sampling_settings_in_the_body(server):
    greedy = [_wav(_speech(server, input="Same words.", temperature=0, seed=s, max_audio_ms=480).content)
              for s in (1, 2)]
    np.testing.assert_array_equal(greedy[0], greedy[1])  # greedy: the seed does not matter
    sampled = [_wav(_speech(server, input="Same words.", temperature=1.5, topk=2048, seed=s,
                            max_audio_ms=480).content) for s in (1, 2)]
    assert sampled[0].shape != sampled[1].shape or not np.array_equal(sampled[0], sampled[1])


@pytest.mark.parametrize("body, message", [
    ({"input": "  "}, "'input' is empty"),
    ({"voice": "bob"}, "unknown voice 'bob'; available: default, alice"),
    ({"response_format": "mp3"}, "unsupported response_format 'mp3'"),
    ({"input": "x" * 5000}, "limit is 4096"),
    ({"speed": 1.5}, "speed 1.5 is not supported"),
    ({"max_audio_ms": "long"}, "'max_audio_ms' must be an integer"),
    ({"temperature": -1}, "'temperature' must be a number"),
    ({"topk": 0}, "'topk' must be an integer from 1"),
])
def test_bad_requests_get_4xx(server, body, message):
    r = _speech(server, **body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert _speech(server, max_audio_ms=160).status_code == 200  # still serving


def test_disconnect_frees_slot_and_full_queue_answers_429(server):
    def busy():
        return httpx.get(server + "/health").json()

    clients = []
    for i in range(2):  # occupy both slots with long streams, read a little, keep the connections open
        c = httpx.Client(timeout=300)
        resp = c.send(c.build_request("POST", server + "/v1/audio/speech",
                                      json={"input": f"A long answer {i}.", "max_audio_ms": 60000, "seed": i}),
                      stream=True)
        assert resp.status_code == 200
        it = resp.iter_bytes()  # keep the iterator: dropping it would close the stream
        next(it)
        clients.append((c, resp, it))
    h0 = busy()
    assert h0["busy_slots"] == 2, h0
    waiting = []
    for i in range(4):  # fill the queue of 4
        t = threading.Thread(target=lambda: waiting.append(_speech(server, max_audio_ms=160)))
        t.start()
        waiting.append(t)
    deadline = time.time() + 30
    while busy()["queued"] < 4 and time.time() < deadline:
        time.sleep(0.1)
    r = _speech(server, max_audio_ms=160)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    for c, resp, _ in clients:  # the clients go away mid-stream
        resp.close()
        c.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        h = busy()
        if h["busy_slots"] == 0 and h["queued"] == 0:
            break
        time.sleep(0.2)
    assert h["busy_slots"] == 0 and h["queued"] == 0, h
    for t in [w for w in waiting if isinstance(w, threading.Thread)]:
        t.join()
    assert [r.status_code for r in waiting if isinstance(r, httpx.Response)] == [200] * 4
