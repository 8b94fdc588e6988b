"""The HTTP server as a user meets it: a real uvicorn process on a loopback port, a tiny random checkpoint,
a voices folder, concurrent clients, disconnects, a full queue and bad requests; and the server under abuse:
malformed bodies and headers (and a fuzzer of them), oversized and slow requests, clients that leave, a
failing engine step, idle WebSockets, shutdown. One server process serves most tests (4 slots, 8 queued)."""

import http.client
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from csm_jax.testing.inputs import speech_like

ROOT = Path(__file__).resolve().parents[1]

# Runs scripts/serve.py with Engine.step wrapped: when the file $CSM_JAX_TEST_FAULT_FILE appears, it is removed
# and the next 3 steps raise (the failing step, then the worker's first two checks after its reset).
FAULTY = """
import os, runpy, sys
from csm_jax import engine
step, left = engine.Engine.step, [0]
def faulty(self):
    path = os.environ["CSM_JAX_TEST_FAULT_FILE"]
    if os.path.exists(path):
        os.remove(path)
        left[0] = 3
    if left[0]:
        left[0] -= 1
        raise RuntimeError("injected engine failure")
    return step(self)
engine.Engine.step = faulty
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# Runs scripts/serve.py with its warm-up slowed (0.5 s before each program) and failing at its last program.
WARMUP_FAILS = """
import runpy, sys, time
from csm_jax import programs
table = programs.Programs.table
class Slow:
    def __init__(self, fn):
        self.fn = fn
    def lower(self, *args):
        time.sleep(0.5)
        return self.fn.lower(*args)
class Fail:
    def lower(self, *args):
        raise RuntimeError("injected warm-up failure")
def slow_then_failing(self, state, mimi_state):
    entries = table(self, state, mimi_state)
    return [p._replace(fn=Slow(p.fn)) for p in entries[:-1]] + [entries[-1]._replace(fn=Fail())]
programs.Programs.table = slow_then_failing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(csm_dir, tmp_path_factory, *extra, env=None, launcher=None, warmup=False):
    """scripts/serve.py on a free port, returned once /health answers 200. Without `warmup` the engine
    compiles on first use (--no-warmup: quicker to start; the warm-up has its own test)."""
    voices = tmp_path_factory.mktemp("voices")
    sf.write(voices / "alice.wav", speech_like(24000, seed=8), 24000)
    (voices / "alice.txt").write_text("Hello, I am Alice.")
    (voices / "alice.json").write_text('{"speaker": 1}')
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    cmd = [sys.executable, *(["-c", launcher] if launcher else []), str(ROOT / "scripts" / "serve.py"),
           "--checkpoint", str(csm_dir), "--voices-dir", str(voices), "--port", str(port), "--slots", "2",
           "--max-queue", "4", *([] if warmup else ["--no-warmup"]), *extra]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
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


def _conversations_available():
    try:
        from converse_fixtures import whisper_tiny_en

        return whisper_tiny_en() if find_spec("silero_vad") else None
    except BaseException:  # noqa: BLE001 - pytest's skip: the WebSocket test says what is missing
        return None


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fault") / "fail-next-step"


@pytest.fixture(scope="module")
def server(csm_dir, tmp_path_factory, fault_file):
    """4 slots, 8 queued; 2 s for a request's headers and body; WebSockets: 1 s to start, 2 s idle, one at a
    time (their LLM is never reached: these tests end before a turn); engine steps fail on demand (FAULTY)."""
    asr = _conversations_available()
    converse = (["converse", "--llm-url", "http://127.0.0.1:9/v1", "--asr-model", asr, "--max-conversations", "1"]
                if asr else [])
    proc, url = _start(csm_dir, tmp_path_factory, "--slots", "4", "--max-queue", "8", "--request-timeout", "2",
                       "--ws-start-timeout", "1", "--ws-idle-timeout", "2", *converse,
                       env={"CSM_JAX_TEST_FAULT_FILE": str(fault_file)}, launcher=FAULTY)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def _health(url):
    return httpx.get(url + "/health", timeout=30)


def _wait(url, what, ok, seconds):
    deadline = time.time() + seconds
    while not ok(h := _health(url).json()):
        assert time.time() < deadline, f"{what} not reached in {seconds} s: {h}"
        time.sleep(0.05)
    return h


def _error(status, content_type, data, want_status=400, message=None, param=None):
    """Asserts an error in OpenAI's shape; returns its message."""
    assert status == want_status, (status, data[:300])
    assert content_type.startswith("application/json"), content_type
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), err
    assert err["type"] == ("rate_limit_error" if status == 429 else "server_error" if status >= 500
                           else "invalid_request_error"), err
    if message is not None:
        assert message in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.slow
def test_shutdown_answers_503_and_ends_streams(csm_dir, tmp_path_factory):
    """SIGTERM drains: what is in flight gets --shutdown-grace (1 s, too short for these); then a waiting
    request and a non-streamed one in a slot get 503 and a stream ends cleanly (a complete chunked response);
    the process exits with 0. (tests/test_server_ops.py: a drain that lets everything finish.)"""
    proc, url = _start(csm_dir, tmp_path_factory, "--shutdown-grace", "1")
    got, answers = [], {}

    def listen():
        try:
            with httpx.stream("POST", url + "/v1/audio/speech", timeout=120,
                              json={"input": "A very long answer.", "max_audio_ms": 60000}) as r:
                for chunk in r.iter_bytes():
                    got.append(len(chunk))
            got.append("complete")
        except httpx.HTTPError as e:
            got.append(e)

    def ask(name, **body):
        answers[name] = httpx.post(url + "/v1/audio/speech", timeout=120,
                                   json={"input": f"The {name} answer.", "max_audio_ms": 60000, "stream": False,
                                         **body})

    threads = [threading.Thread(target=listen), threading.Thread(target=ask, args=("in-slot",))]
    for t in threads:
        t.start()
    _wait(url, "both slots busy", lambda h: h["busy_slots"] == 2, 120)
    threads.append(threading.Thread(target=ask, args=("queued",)))
    threads[-1].start()
    _wait(url, "one queued", lambda h: h["queued"] == 1, 30)
    while not got:
        time.sleep(0.1)
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    for name in ("queued", "in-slot"):
        r = answers[name]
        _error(r.status_code, r.headers["content-type"], r.content, 503, "shutting down")
        assert r.json()["error"]["code"] == "shutting_down"
    assert got[-1] == "complete" and sum(got[:-1]) > 44, got[-3:]


def _speech(url, **body):
    body = {"model": "csm-1b", "input": "Hello there.", "voice": "alice", **body}
    return httpx.post(url + "/v1/audio/speech", json=body, timeout=300)


def _wav(content):
    # The streamed WAV header declares an open-ended size; read the PCM after the 44-byte header.
    assert content[:4] == b"RIFF" and content[8:12] == b"WAVE"
    return np.frombuffer(content[44:], "<i2")


@pytest.mark.slow
def test_more_requests_than_slots_each_equal_alone(server):
    reqs = [dict(input=f"Request number {i}.", seed=i, max_audio_ms=640) for i in range(6)]
    results = [None] * 6

    def go(i):
        results[i] = _speech(server, **reqs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(6)]
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


def _addr(url):
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _send(url, body: dict) -> socket.socket:
    """A speech request sent on a socket of its own, nothing read: a client that may go away at any time."""
    data = json.dumps(body).encode()
    s = socket.create_connection(_addr(url))
    s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def _read_response(s, seconds=10):
    """(status, headers, body) of one response with a Content-Length, read from a raw socket."""
    s.settimeout(seconds)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = s.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


@pytest.mark.slow
def test_capacity_is_slots_plus_queue_and_clients_that_leave_free_their_places(server):
    # A burst of 12 (4 slots + 8 queued) on the idle server: none is refused, streamed or not.
    results = [None] * 12

    def go(i):
        results[i] = _speech(server, input=f"Burst {i}.", max_audio_ms=160, stream=i % 2 == 0)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200] * 12, [r.text[:200] for r in results if r.status_code != 200]
    # Long requests hold the 4 slots (two streamed, two not) and the 8 queue places; the 13th gets 429.
    socks = [_send(server, {"input": f"A long answer {i}.", "max_audio_ms": 100_000, "seed": i,
                            "stream": i % 2 == 0}) for i in range(4)]
    _wait(server, "4 busy slots", lambda h: h["busy_slots"] == 4, 120)
    socks += [_send(server, {"input": f"Waiting {i}.", "max_audio_ms": 60000, "stream": i % 2 == 0})
              for i in range(8)]
    _wait(server, "8 queued", lambda h: h["queued"] == 8, 30)
    r = _speech(server, max_audio_ms=160)
    _error(r.status_code, r.headers["content-type"], r.content, 429, "busy")
    assert r.headers["retry-after"] == "1"
    # Waiting clients that leave free their places at once; clients in a slot, streamed or not, their slot
    # after the engine step under way (well before their 100 s of audio could be done).
    for s in socks[4:]:
        s.close()
    h = _wait(server, "queue emptied", lambda h: h["queued"] == 0, 5)
    assert h["busy_slots"] == 4, h
    for s in socks[:4]:
        s.close()
    _wait(server, "slots freed", lambda h: h["busy_slots"] == 0, 5)
    assert _speech(server, max_audio_ms=160).status_code == 200


MALFORMED = [  # (body, message, param): each a 400 in OpenAI's error shape
    ({"input": "Hi.", "voice": ["alice"]}, "'voice' must be a string", "voice"),
    ({"input": "Hi.", "voice": {"name": "alice"}}, "'voice' must be a string", "voice"),
    ({"input": "Hi.", "response_format": ["wav"]}, "unsupported response_format", "response_format"),
    ({"input": "Hi.", "response_format": {"type": "wav"}}, "unsupported response_format", "response_format"),
    ({"input": "Hi.", "seed": 2**100}, "'seed' must be an integer from 0 to 4294967295", "seed"),
    ({"input": "Hi.", "seed": 2**32}, "'seed' must be an integer from 0 to 4294967295", "seed"),
    ({"input": "Hi.", "seed": -1}, "'seed' must be an integer", "seed"),
    ({"input": "Hi.", "seed": 1.0}, "'seed' must be an integer", "seed"),
    ({"input": "Hi.", "seed": True}, "'seed' must be an integer", "seed"),
    ({"input": "Hi \ud800 there."}, "lone surrogate", "input"),
    ({"input": 42}, "'input' must be a string (the text to speak), got int", "input"),
    ({"input": ["Hi."]}, "'input' must be a string", "input"),
    ({"voice": "alice"}, "'input' is missing", "input"),
    ({"input": "Hi.", "stream": "yes"}, "'stream' must be true or false", "stream"),
    ({"input": "Hi.", "model": 5}, "'model' must be a string", "model"),
    ({"input": "Hi.", "speed": True}, "speed True is not supported", "speed"),
    ({"input": "Hi.", "max_audio_ms": 10**30}, "'max_audio_ms' must be an integer from 80", "max_audio_ms"),
    ({"input": "Hi.", "topk": 1e9}, "'topk' must be an integer", "topk"),
    (b'{"input": "Hi.", "temperature": NaN}', "'temperature' must be a number", "temperature"),
    (b'{"input": "Hi.", "seed": 1' + b"0" * 5000 + b"}", "the body must be a JSON object", None),
    (b"[" * 20000 + b"]" * 20000, "nested too deeply", None),
    (b'{"input": ' + b"[" * 30000, "nested too deeply", None),
    (b"not json", "the body must be a JSON object", None),
    (b"", "the body must be a JSON object", None),
    (b"[1, 2]", "the body must be a JSON object, got list", None),
    (b'{"input": "caf\xe9"}', "the body must be a JSON object", None),  # Latin-1, not UTF-8
]


def test_malformed_requests_get_json_4xx_on_the_same_connection(server):
    conn = http.client.HTTPConnection(*_addr(server), timeout=300)

    def ask(method, path, body=None, headers=None):
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("content-type", ""), r.read()

    assert ask("GET", "/health")[0] == 200
    sock = conn.sock
    for body, message, param in MALFORMED:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        _error(*ask("POST", "/v1/audio/speech", raw), 400, message, param)
        assert conn.sock is sock, f"the connection was closed after {raw[:80]!r}"
    _error(*ask("GET", "/v1/no-such-route"), 404)
    _error(*ask("GET", "/v1/audio/speech"), 405)
    _error(*ask("GET", "/health", headers={"X-Big": "a" * 20000}), 431, "headers are over 16384 bytes")
    assert conn.sock is sock
    status, ctype, data = ask("POST", "/v1/audio/speech", json.dumps({"input": "Still fine.", "max_audio_ms": 160}))
    assert status == 200 and ctype == "audio/wav" and len(_wav(data)) > 0 and conn.sock is sock
    conn.close()
    # Malformed HTTP (a broken request line, headers that trickle in past 16 KB) is answered in the same JSON
    # shape, and that connection is closed (HTTP cannot find the next request's start after it).
    trickle = [b"GET /health HTTP/1.1\r\nHost: x\r\n"] + [b"X-A: " + b"a" * 2000 + b"\r\n"] * 12
    for pieces in ([b"NOT HTTP AT ALL\r\n\r\n"], trickle):
        with socket.create_connection(_addr(server)) as s:
            for piece in pieces:
                if select.select([s], [], [], 0.05)[0]:
                    break  # answered
                s.sendall(piece)
            status, headers, data = _read_response(s)
            _error(status, headers["content-type"], data, 400, "malformed HTTP")
            assert headers["connection"] == "close"
    assert _health(server).json()["status"] == "ok"


def test_seeds_span_the_uint32_range(server):
    a, b = (_speech(server, input="Same words.", temperature=1.5, topk=2048, seed=s, max_audio_ms=480)
            for s in (0, 2**32 - 1))
    assert a.status_code == b.status_code == 200
    assert len(a.content) != len(b.content) or a.content != b.content  # distinct seeds, distinct streams
    r = _speech(server, seed=2**32)  # once wrapped to seed 0
    _error(r.status_code, r.headers["content-type"], r.content, 400, "from 0 to 4294967295", "seed")


def test_bodies_over_the_limit_get_413_before_they_are_read(server):
    # Declared by Content-Length: refused once the headers are in, with none of the 500 MB sent.
    with socket.create_connection(_addr(server)) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 500000000\r\n\r\n")
        status, headers, data = _read_response(s)
        _error(status, headers["content-type"], data, 413, "over 65536 bytes")
        assert headers["connection"] == "close"
    # Chunked, no length given: refused as soon as 64 KB have arrived.
    with socket.create_connection(_addr(server)) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        sent, chunk = 0, b'{"input": "' + b"a" * 8180
        while not select.select([s], [], [], 0.05)[0]:
            assert sent < 256 * 1024, "no answer after 256 KB"
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
        status, headers, data = _read_response(s)
        _error(status, headers["content-type"], data, 413, "over 65536 bytes")
        assert sent <= 128 * 1024, sent
    r = httpx.post(server + "/v1/audio/speech", content=b"[" * 100_000 + b"]" * 100_000, timeout=60)
    _error(r.status_code, r.headers["content-type"], r.content, 413)  # nested 100k deep: over the limit
    assert _health(server).json()["status"] == "ok"


def test_slow_clients_are_timed_out(server):
    """--request-timeout 2: a connection that sends nothing, or trickles its headers, is closed; a body that
    does not arrive gets 408."""
    silent = socket.create_connection(_addr(server))
    trickle = socket.create_connection(_addr(server))
    trickle.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n")
    t0 = time.time()
    closed_at = {}
    while len(closed_at) < 2 and time.time() - t0 < 15:
        if "trickle" not in closed_at:
            try:
                trickle.sendall(b"X")  # a byte every 0.2 s: uvicorn's keep-alive timer alone would never fire
            except OSError:
                closed_at["trickle"] = time.time() - t0
        for name, s in (("silent", silent), ("trickle", trickle)):
            if name not in closed_at and select.select([s], [], [], 0)[0]:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                assert data == b"", data
                closed_at[name] = time.time() - t0
        time.sleep(0.2)
    assert set(closed_at) == {"silent", "trickle"} and max(closed_at.values()) < 6, closed_at
    silent.close()
    trickle.close()
    with socket.create_connection(_addr(server)) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"input\": ")
        status, headers, data = _read_response(s, 10)
        _error(status, headers["content-type"], data, 408, "did not arrive within 2 s")
    assert _health(server).json()["status"] == "ok"


@pytest.mark.slow
def test_failed_engine_step_ends_every_request_and_the_engine_recovers(server, fault_file):
    ref = _speech(server, input="Before and after.", seed=3, max_audio_ms=480, stream=False)
    assert ref.status_code == 200
    streamed, answers = [], {}

    def listen():
        try:
            with httpx.stream("POST", server + "/v1/audio/speech", timeout=120,
                              json={"input": "A long stream.", "max_audio_ms": 60000}) as r:
                for chunk in r.iter_bytes():
                    streamed.append(len(chunk))
            streamed.append("complete")
        except httpx.HTTPError as e:
            streamed.append(e)

    def ask(i):
        try:
            answers[i] = httpx.post(server + "/v1/audio/speech", timeout=120, json={
                "input": f"A long answer {i}.", "max_audio_ms": 60000, "stream": i % 2 == 0})
        except httpx.HTTPError as e:
            answers[i] = e

    threads = [threading.Thread(target=listen)] + [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    _wait(server, "4 busy slots", lambda h: h["busy_slots"] == 4, 120)
    threads += [threading.Thread(target=ask, args=(i,)) for i in range(3, 5)]  # these two wait in the queue
    for t in threads[4:]:
        t.start()
    before = _wait(server, "2 queued", lambda h: h["queued"] == 2, 30)["engine_failures"]
    counted = _counters(server)
    while not streamed:
        time.sleep(0.05)
    fault_file.touch()
    deadline = time.time() + 60
    while (h := _health(server)).status_code == 200:
        assert time.time() < deadline, h.json()
        time.sleep(0.02)
    assert h.status_code == 503 and h.json()["status"] == "error" and "injected engine failure" in h.json()["error"]
    r = _speech(server, max_audio_ms=160)  # while the engine is being reset and checked: 503 at once
    _error(r.status_code, r.headers["content-type"], r.content, 503, "the speech engine failed")
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive()
    assert isinstance(streamed[-1], httpx.RemoteProtocolError), streamed[-3:]  # cut short, not left open
    assert sorted(answers) == list(range(5))
    for i, r in answers.items():  # in a slot (0..2) or waiting (3, 4), streamed (even i) or not: 503 with the
        if i in (0, 2) and isinstance(r, httpx.RemoteProtocolError):  # cause, or a stream cut short once begun
            continue
        assert isinstance(r, httpx.Response), (i, r)
        err = _error(r.status_code, r.headers["content-type"], r.content, 503, "injected engine failure")
        assert err["code"] == "engine_failed" and r.headers["retry-after"] == "1", i
    h = _wait(server, "recovery", lambda h: h["status"] == "ok", 60)
    assert h["engine_failures"] >= before + 1 and h["busy_slots"] == h["queued"] == 0
    # Prometheus counts the failing step and the two failed checks after it, and one restart.
    now = _counters(server)
    assert (now["csm_engine_failures_total"] - counted["csm_engine_failures_total"],
            now["csm_engine_restarts_total"] - counted["csm_engine_restarts_total"]) == (3, 1)
    after = _speech(server, input="Before and after.", seed=3, max_audio_ms=480, stream=False)
    assert after.status_code == 200 and after.content == ref.content  # a fresh engine: the same audio as before


def _counters(url) -> dict:
    """/metrics' unlabelled samples, read with prometheus-client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_idle_or_junk_websockets_are_closed(server):
    if _conversations_available() is None:
        from converse_fixtures import require, whisper_tiny_en

        whisper_tiny_en()
        require("silero-vad", False, "pip install --no-deps silero-vad")
    import asyncio

    import websockets
    from websockets.exceptions import ConnectionClosed

    ws_url = server.replace("http", "ws") + "/v1/converse"

    async def closed(ws, seconds=20):
        t0 = time.time()
        with pytest.raises(ConnectionClosed) as e:
            while True:
                await asyncio.wait_for(ws.recv(), seconds)
        assert e.value.rcvd is not None, "no close frame"
        return e.value.rcvd.code, e.value.rcvd.reason, time.time() - t0

    async def run():
        idle = await websockets.connect(ws_url)  # never sends start: closed after 1 s
        other = await websockets.connect(ws_url)  # meanwhile the one conversation place is taken
        assert (await closed(other))[0] == 1013
        code, reason, seconds = await closed(idle)
        assert code == 1008 and "no start message within 1 s" in reason and seconds < 5
        junk = await websockets.connect(ws_url)
        await junk.send("junk")
        msg = json.loads(await asyncio.wait_for(junk.recv(), 20))
        assert msg["type"] == "error" and "start" in msg["message"]
        assert (await closed(junk))[0] == 1003
        quiet = await websockets.connect(ws_url)  # the place is free again
        await quiet.send(json.dumps({"type": "start", "sample_rate": 16000}))
        assert json.loads(await asyncio.wait_for(quiet.recv(), 60)) == {"type": "ready"}
        code, reason, seconds = await closed(quiet)
        assert code == 1008 and "nothing received for 2 s" in reason and seconds < 10

    asyncio.run(run())
    _wait(server, "conversations freed", lambda h: h["conversations"] == 0, 10)


def _junk(rng, depth=0):
    """A random JSON value: odd numbers, odd strings (surrogates, controls), nesting."""
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 1, 2**31, 2**32, 2**63, 2**100, -(2**70), rng.randrange(-10**6, 10**6)])
    if kind == 2:
        return rng.choice([0.5, -0.0, 1e308, -1e-308, 1.0, float("nan"), float("inf"), rng.uniform(-1e3, 1e3)])
    if kind in (3, 4):
        alphabet = "ab \t\n\"\\\x00\x7f\ud800\udfff\u00e9\u4e2d\U0001f600{}[]"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
    if kind in (5, 6):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {_junk(rng, 3) if rng.random() < 0.5 else rng.choice(FIELDS): _junk(rng, depth + 1)
            for _ in range(rng.randrange(0, 4))}


FIELDS = ["model", "input", "voice", "response_format", "speed", "stream", "seed", "max_audio_ms", "temperature",
          "topk"]
REFUSED = {  # values each field refuses, whatever the others are
    "input": ["", "   ", 5, [], {}, "x" * 5000, "a\ud800", True, None],
    "voice": ["nobody", 3, [], {}, True], "response_format": ["mp3", 1, [], None, "WAV"],
    "speed": [0.5, "1", True, None, []], "stream": ["yes", 1, None, []],
    "seed": [-1, 2**32, 2**100, 0.5, "1", True, None], "max_audio_ms": [0, 79, 10**9, "1000", None, 100.0],
    "temperature": [-0.1, 5.5, "hot", None, float("nan"), float("inf")], "topk": [0, 4096, 1.5, None, "50"],
    "model": [1, [], {}],
}


def _fuzz_body(rng) -> bytes:
    kind = rng.randrange(5)
    if kind == 0:  # random bytes
        return rng.randbytes(rng.randrange(0, 200))
    if kind == 1:  # a JSON value that is not an object
        while isinstance(v := _junk(rng), dict):
            pass
        return json.dumps(v).encode()
    body = {"input": "Hello.", **{rng.choice(FIELDS): _junk(rng) for _ in range(rng.randrange(0, 4))}}
    bad = rng.choice(list(REFUSED))
    body[bad] = rng.choice(REFUSED[bad])
    text = json.dumps(body).encode()
    if kind == 2:  # a strict prefix of an object is never JSON
        return text[:rng.randrange(1, len(text))]
    if kind == 3:  # a byte that is never UTF-8 somewhere inside
        i = rng.randrange(len(text))
        return text[:i] + rng.choice([b"\xff", b"\xc0", b"\xfe"]) + text[i:]
    return text  # well-formed, with one refused field


def _fuzz_headers(rng) -> dict:
    token = "abcdefghijklmnopqrstuvwxyz0123456789-!#$%&'*+.^_`|~"
    printable = "".join(chr(c) for c in range(0x20, 0x7f))
    headers = {"Content-Type": rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                           "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                           "".join(rng.choice(token) for _ in range(rng.randrange(1, 20)))])}
    for _ in range(rng.randrange(0, 5)):
        name = "X-" + "".join(rng.choice(token) for _ in range(rng.randrange(1, 30)))
        headers[name] = "".join(rng.choice(printable) for _ in range(rng.randrange(0, 200))).strip()
    for name, values in (("Accept", ["*/*", "audio/wav", "text/html", "application/json;q=0.1"]),
                         ("Content-Encoding", ["gzip", "br", "identity"]), ("Accept-Encoding", ["gzip", "*;q=0"]),
                         ("Authorization", ["Bearer x", "Basic !!!"]), ("Expect", ["100-continue"]),
                         ("Cookie", ["a=b; c"])):
        if rng.random() < 0.2:
            headers[name] = rng.choice(values)
    return headers


def test_fuzzed_bodies_and_headers_get_json_4xx_on_one_connection(server):
    """A few hundred random malformed bodies (and well-formed but odd headers) on one keep-alive connection:
    each a 4xx JSON error in OpenAI's shape; the connection stays open; the server stays healthy."""
    import random

    rng = random.Random(13)
    conn = http.client.HTTPConnection(*_addr(server), timeout=60)
    conn.request("GET", "/health")
    assert conn.getresponse().read() and conn.sock is not None
    sock, t0, n = conn.sock, time.time(), 0
    while n < 300 and time.time() - t0 < 120:
        body, headers = _fuzz_body(rng), _fuzz_headers(rng)
        path, method = rng.choice([("/v1/audio/speech", "POST")] * 8 + [("/v1/audio/speech", "PUT"),
                                                                         ("/v1/nothing", "POST")])
        chunked = rng.random() < 0.3
        conn.request(method, path, body=iter([body]) if chunked else body, headers=headers, encode_chunked=chunked)
        r = conn.getresponse()
        data = r.read()
        assert 400 <= r.status < 500 and r.status != 413, (r.status, body[:200], headers, data[:300])
        _error(r.status, r.getheader("content-type", ""), data, r.status)
        assert conn.sock is sock, f"connection closed after {body[:200]!r} {headers}"
        n += 1
    assert n >= 100, f"only {n} requests in the time allowed"
    conn.request("POST", "/v1/audio/speech", body=json.dumps({"input": "Still fine.", "max_audio_ms": 160}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and len(_wav(r.read())) > 0 and conn.sock is sock
    conn.close()
    assert _health(server).json()["status"] == "ok"


@pytest.mark.slow
def test_warmup_compiles_before_serving_and_health_says_so(csm_dir, tmp_path_factory):
    """With the warm-up (the default), /health answers 503 "warming" until every program is compiled, then
    200 "ok"; a request sent while warming waits and is served."""
    port_holder = {}
    voices = tmp_path_factory.mktemp("voices-warm")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log-warm") / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint", str(csm_dir),
                             "--voices-dir", str(voices), "--port", str(port), "--slots", "1", "--max-queue", "2"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        seen, metered = [], []
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                r = httpx.get(url + "/health", timeout=2)
                seen.append((r.status_code, r.json()["status"]))
                m = _counters(url)  # Prometheus says the same
                metered.append((m["csm_warming"], m["csm_warmup_programs_compiled"], m["csm_warmup_programs"]))
                if r.status_code == 200:
                    break
                if len(seen) == 1 or seen[-1] != seen[-2]:  # while warming: a request waits for the warm-up
                    port_holder["early"] = httpx.post(url + "/v1/audio/speech", timeout=600, json={
                        "input": "Sent while warming.", "max_audio_ms": 160, "stream": False})
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "the server exited"
            time.sleep(0.5)
        assert (503, "warming") in seen and seen[-1] == (200, "ok"), seen
        total = metered[-1][2]
        assert total > 1 and metered[-1] == (0, total, total), metered
        assert any(w == 1 and c < total for w, c, t in metered) and all(t in (0, total) for *_, t in metered)
        assert port_holder["early"].status_code == 200 and len(port_holder["early"].content) > 44
        log.seek(0)
        assert "warm-up:" in log.read()
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.slow
def test_warmup_failure_ends_the_server_with_its_cause(csm_dir, tmp_path_factory):
    """A warm-up that fails (injected at its last program) ends the process non-zero with the cause on stderr,
    nothing left waiting; until then /health answers 503 "warming" with the programs compiled of the total:
    with one slot, 1 generation program + 4 prefill piece sizes + reset, start, Mimi reset, stop and rewind =
    10."""
    voices = tmp_path_factory.mktemp("voices-fail")
    port = _free_port()
    logs = tmp_path_factory.mktemp("log-fail")
    out, err = open(logs / "stdout.log", "w+"), open(logs / "stderr.log", "w+")
    proc = subprocess.Popen([sys.executable, "-c", WARMUP_FAILS, str(ROOT / "scripts" / "serve.py"),
                             "--checkpoint", str(csm_dir), "--voices-dir", str(voices), "--port", str(port),
                             "--slots", "1"], stdout=out, stderr=err)
    url = f"http://127.0.0.1:{port}"
    seen = []
    try:
        deadline = time.time() + 600
        while proc.poll() is None:
            assert time.time() < deadline, "the server did not end"
            try:
                r = httpx.get(url + "/health", timeout=2)
                seen.append((r.status_code, r.json()))
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert proc.wait() != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    err.seek(0)
    stderr = err.read()
    assert ("RuntimeError: the server stopped: the driver stopped: its warm-up failed (RuntimeError: injected "
            "warm-up failure)") in stderr, stderr[-3000:]
    warming = [body for status, body in seen if body["status"] == "warming"]
    assert warming and all(status == 503 for status, body in seen if body["status"] == "warming"), seen
    compiled = [body["warmup"]["compiled"] for body in warming]
    assert {body["warmup"]["programs"] for body in warming} == {10}
    assert compiled == sorted(compiled) and len(set(compiled)) >= 2 and max(compiled) <= 9, compiled
