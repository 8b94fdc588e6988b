"""The server as an operator runs it, against a real server process (scripts/serve.py on the tiny checkpoint):
API keys (from flags, a file and the environment; HTTP and the conversation WebSocket), request ids and the
access log (JSON lines read from the process's stderr), Prometheus metrics (read with prometheus-client's own
parser), the drain on SIGTERM."""

import asyncio
import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from csm_jax.server.keys import collect_keys
from test_server import _addr, _conversations_available, _error, _free_port, _read_response, _wav

ROOT = Path(__file__).resolve().parents[1]
FLAG_KEYS = ("flag-key-1", "flag-key-2")
FILE_KEYS = ("file-key-1", "file/key+2=")  # base64 characters: the browser's subprotocol must encode them
ENV_KEY = "env-key-1"
TEXT = "Sphinx of black quartz, judge my vow."  # never in the log


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def text(self) -> str:
        return self.log.read_text()


def _launch(csm_dir, folder: Path, *extra, env=None) -> Server:
    """scripts/serve.py (--no-warmup, 2 slots, 2 queued) on a free port, once /health answers 200; stdout and
    stderr go to folder/server.log."""
    port = _free_port()
    log = folder / "server.log"
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint", str(csm_dir), "--port", str(port),
           "--slots", "2", "--max-queue", "2", "--no-warmup", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Server(proc, url, log)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + log.read_text())
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start in 600 s:\n" + log.read_text())


@pytest.fixture(scope="module")
def keyed(csm_dir, tmp_path_factory):
    """Keys from --api-key twice, a key file (with a comment and blank lines) and $CSM_JAX_API_KEYS; the
    conversation WebSocket when its parts are installed (its LLM is never reached)."""
    folder = tmp_path_factory.mktemp("keyed")
    key_file = folder / "keys.txt"
    key_file.write_text(f"# the team's keys\n\n{FILE_KEYS[0]}\n  {FILE_KEYS[1]}  \n\n")
    asr = _conversations_available()
    converse = ["converse", "--llm-url", "http://127.0.0.1:9/v1", "--asr-model", asr] if asr else []
    server = _launch(csm_dir, folder, "--api-key", FLAG_KEYS[0], "--api-key", FLAG_KEYS[1], "--api-key-file",
                     str(key_file), "--log-format", "json", *converse, env={"CSM_JAX_API_KEYS": ENV_KEY})
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=60)
    log = server.text()
    for secret in (*FLAG_KEYS, *FILE_KEYS, ENV_KEY, "wrong-key", TEXT):
        assert secret not in log, f"the server's log holds a key or a request's text: {secret}"


def _ask(conn, method, path, body=None, key=None, headers=None):
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    conn.request(method, path, body=body, headers={"Content-Type": "application/json", **auth, **(headers or {})})
    r = conn.getresponse()
    return r, r.read()


def test_requests_without_a_valid_key_get_401_on_a_connection_that_stays_open(keyed):
    conn = http.client.HTTPConnection(*_addr(keyed.url), timeout=300)
    r, data = _ask(conn, "GET", "/health")  # open: a load balancer's check needs no key
    assert r.status == 200 and json.loads(data)["status"] == "ok"
    sock = conn.sock
    body = json.dumps({"input": "Hello.", "max_audio_ms": 160})
    for path, key, headers, missing in [("/v1/audio/speech", None, None, True),
                                        ("/v1/audio/speech", "wrong-key", None, False),
                                        ("/v1/audio/speech", None, {"Authorization": f"Basic {FLAG_KEYS[0]}"}, True),
                                        ("/v1/audio/speech", f"{FLAG_KEYS[0]}x", None, False),
                                        ("/v1/models", None, None, True),
                                        ("/v1/no-such-route", None, None, True)]:
        r, data = _ask(conn, "POST" if path.endswith("speech") else "GET", path, body, key, headers)
        err = _error(r.status, r.getheader("content-type", ""), data, 401,
                     "no API key" if missing else "invalid API key")
        assert err["type"] == "invalid_request_error" and err["code"] == "invalid_api_key", err
        assert r.getheader("www-authenticate") == "Bearer"
        assert conn.sock is sock, "the connection was closed after a 401"
    r, data = _ask(conn, "POST", "/v1/audio/speech", body, FLAG_KEYS[1])
    assert r.status == 200 and len(_wav(data)) > 0 and conn.sock is sock
    conn.close()


def test_every_configured_key_is_accepted(keyed):
    for key in (*FLAG_KEYS, *FILE_KEYS, ENV_KEY):
        r = httpx.post(keyed.url + "/v1/audio/speech", headers={"Authorization": f"Bearer {key}"}, timeout=300,
                       json={"input": "Hello.", "max_audio_ms": 160, "stream": False})
        assert r.status_code == 200 and len(_wav(r.content)) > 0, (key, r.text[:300])
        assert httpx.get(keyed.url + "/v1/models", headers={"Authorization": f"bearer {key}"}).status_code == 200


def test_the_conversation_websocket_needs_a_key(keyed):
    if _conversations_available() is None:
        from converse_fixtures import require, whisper_tiny_en

        whisper_tiny_en()
        require("silero-vad", False, "pip install --no-deps silero-vad")
    import websockets
    from websockets.exceptions import InvalidStatus

    ws_url = keyed.url.replace("http", "ws") + "/v1/converse"
    as_protocol = lambda key: "csm-jax.key." + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")  # noqa: E731

    async def refused(**kw):
        with pytest.raises(InvalidStatus) as e:
            await websockets.connect(ws_url, **kw)
        r = e.value.response
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r
        assert json.loads(r.body)["error"]["code"] == "invalid_api_key"

    async def talks(**kw):
        async with websockets.connect(ws_url, **kw) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 120)) == {"type": "ready"}
            return ws.subprotocol

    async def run():
        await refused()
        await refused(additional_headers={"Authorization": "Bearer wrong-key"})
        await refused(subprotocols=["csm-jax", as_protocol("wrong-key")])
        await refused(subprotocols=["csm-jax", "csm-jax.key.!!"])
        assert await talks(additional_headers={"Authorization": f"Bearer {FLAG_KEYS[0]}"}) is None
        # While one is open: one conversation and one WebSocket in the metrics.
        async with websockets.connect(ws_url, additional_headers={"Authorization": f"Bearer {ENV_KEY}"}) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 120)) == {"type": "ready"}
            m = await asyncio.to_thread(_scrape, keyed.url)
            assert _value(m, "csm_conversations_open") == 1 and _value(m, "csm_websocket_connections") == 1, m
        # The browser's way: the key as a subprotocol offered beside "csm-jax", which the server selects.
        assert await talks(subprotocols=["csm-jax", as_protocol(FILE_KEYS[1])]) == "csm-jax"

    asyncio.run(run())
    r = httpx.get(keyed.url + "/converse")  # the page itself is open: it asks for the key
    assert r.status_code == 200 and "API key" in r.text


def test_key_sources_and_their_errors(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# comment\n\n a \nb\n")
    assert collect_keys(["c", "a"], keys, {"CSM_JAX_API_KEYS": "d, e,"}) == ("c", "a", "b", "d", "e")
    assert collect_keys([], None, {}) == ()
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    for args, message in [((["k"], tmp_path / "missing.txt", {}), "no such file"),
                          ((["k"], tmp_path / "empty.txt", {}), "holds no key"),
                          ((["k"], tmp_path, {}), "cannot be read"),
                          (([], None, {"CSM_JAX_API_KEYS": " , "}), "is set but holds no key"),
                          ((["two words"], None, {}), "not printable ASCII without spaces"),
                          ((["caf\u00e9"], None, {}), "not printable ASCII without spaces")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            collect_keys(*args)
    # The command says so at once, before loading anything, with exit status 2.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--api-key-file",
                        str(tmp_path / "empty.txt"), "--checkpoint", str(tmp_path / "no-checkpoint")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds no key" in r.stderr, r.stderr[-2000:]


@pytest.mark.slow
def test_flags_no_server_could_run_with_are_refused_before_the_model_loads(tmp_path):
    """Each mistake is one line naming the flag, status 2, before loading is tried: the checkpoint does not exist
    (with csm-1b, loading takes minutes; a port in use was only found by uvicorn after that)."""
    import soundfile as sf

    def voices(name, files):
        folder = tmp_path / name
        folder.mkdir()
        for f, text in files.items():
            (folder / f).write_text(text)
        if "a.txt" in files:
            sf.write(folder / "a.wav", np.zeros(2400, np.float32), 24000)
        return folder

    (tmp_path / "a-file").write_text("x")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    cases = [
        (["--slots", "0"], "--slots 0: give 1 or more"),
        (["--frames-per-call", "0"], "--frames-per-call 0: give 1 or more"),
        (["--max-queue", "-1"], "--max-queue -1: give 0 or more"),
        (["--max-body-kb", "0"], "--max-body-kb 0: give 1 or more"),
        (["--prefill-rows", "0"], "--prefill-rows 0: give 1 or more"),
        (["--shutdown-grace", "-1"], "--shutdown-grace -1.0: give 0 or more"),
        (["--request-timeout", "0"], "--request-timeout 0.0: give a number of seconds above 0"),
        (["--keep-alive-timeout", "-2"], "--keep-alive-timeout -2.0: give a number of seconds above 0"),
        (["--port", "99999"], "--port 99999: give a port from 1 to 65535"),
        (["--port", str(taken.getsockname()[1])],
         f"cannot listen on 127.0.0.1:{taken.getsockname()[1]} (another process listens there)"),
        (["--slots", "auto"], "--slots auto: the device (cpu) reports no memory figures"),
        (["--voices-dir", tmp_path / "none"], "voices folder not found"),
        (["--voices-dir", tmp_path / "a-file"], "is a file: give a folder of NAME.wav + NAME.txt pairs"),
        (["--voices-dir", voices("v1", {"a.txt": "Hi.", "a.json": "{speaker: 1}"})],
         "voice 'a': " + str(tmp_path / "v1" / "a.json") + ' must be like {"speaker": 1}'),
        (["--voices-dir", voices("v2", {"a.txt": "Hi.", "a.json": '{"speaker": "one"}'})], "speaker must be"),
        (["--voices-dir", voices("v3", {"a.txt": "  \n"})], "is empty: write the words spoken in a.wav"),
        (["--voices-dir", voices("v4", {"b.txt": "Hi."})], "has no audio file beside it (b.wav)"),
        (["converse", "--max-conversations", "0"], "--max-conversations 0: give 1 or more"),
        (["converse", "--temperature", "-1"], "--temperature -1.0: temperature must be"),
    ]
    with taken:
        for args, message in cases:
            r = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint",
                                str(tmp_path / "no-checkpoint"), *map(str, args)], capture_output=True, text=True,
                               timeout=300)
            last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
            assert r.returncode == 2 and last.startswith("error: ") and message in last, (args, r.stderr[-2000:])


def test_the_log_holds_no_jax_info_lines(capfd):
    """JAX logs "Unable to initialize backend 'tpu'" at INFO at every start on a machine without a TPU."""
    import logging

    from csm_jax.server.logs import configure_logging

    root, jax_log = logging.getLogger(), logging.getLogger("jax")
    saved = (list(root.handlers), root.level, jax_log.level)
    try:
        configure_logging("json")
        logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
        logging.getLogger("jax._src.xla_bridge").warning("a warning")
        logging.getLogger("csm_jax.server").info("draining")
        lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()]
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        jax_log.setLevel(saved[2])
    assert [(x["logger"], x["message"]) for x in lines] == [("jax._src.xla_bridge", "a warning"),
                                                            ("csm_jax.server", "draining")]


def _access_lines(server: Server, ids, seconds=20) -> dict:
    """{request id: its access-log line} for `ids`, once all have been written (each exactly once); every line
    of the log is one JSON object."""
    deadline = time.time() + seconds
    while True:
        lines = [json.loads(line) for line in server.text().splitlines() if line.strip()]
        access = [x for x in lines if x["logger"] == "csm_jax.access"]
        found = {x["request_id"]: x for x in access if x["request_id"] in ids}
        if len(found) == len(set(ids)) or time.time() > deadline:
            break
        time.sleep(0.2)
    assert set(found) == set(ids), f"no access line for {set(ids) - set(found)}"
    for i in set(ids):
        assert sum(x["request_id"] == i for x in access) == 1, f"request {i}: more than one access line"
    return found


def test_request_ids_and_one_access_line_per_request(keyed):
    conn = http.client.HTTPConnection(*_addr(keyed.url), timeout=300)
    key = {"Authorization": f"Bearer {ENV_KEY}"}
    sent = {}  # our name -> (the response's X-Request-Id, status, audio samples, seconds the client waited)

    def ask(name, method, path, body=None, headers=None):
        t0 = time.monotonic()
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        audio = len(_wav(data)) if r.status == 200 and path.endswith("speech") else 0
        sent[name] = (r.getheader("x-request-id"), r.status, audio, time.monotonic() - t0)
        return r

    speech = json.dumps({"input": TEXT, "max_audio_ms": 320, "stream": False})
    ask("given", "POST", "/v1/audio/speech", speech, {**key, "X-Request-Id": "client/trace:1"})
    ask("stream", "POST", "/v1/audio/speech", json.dumps({"input": TEXT, "max_audio_ms": 320}), key)
    ask("no key", "POST", "/v1/audio/speech", speech, {"X-Request-Id": "no-key-1"})
    ask("bad body", "POST", "/v1/audio/speech", json.dumps({"input": TEXT, "topk": 0}), key)
    ask("no route", "GET", "/v1/nothing", None, key)
    ask("too long", "GET", "/health", None, {"X-Request-Id": "x" * 129})
    ask("longest", "GET", "/health", None, {"X-Request-Id": "y" * 128})
    ask("spaced", "GET", "/health", None, {"X-Request-Id": "a b"})
    ask("latin-1", "GET", "/health", None, {"X-Request-Id": "caf\u00e9".encode("latin-1")})
    ask("big headers", "GET", "/health", None, {"X-Request-Id": "big-1", "X-Big": "a" * 20000})
    conn.close()
    assert sent["given"][0] == "client/trace:1" and sent["no key"][0] == "no-key-1"
    assert sent["longest"][0] == "y" * 128 and sent["big headers"][0] == "big-1"
    made = [sent[n][0] for n in ("stream", "bad body", "no route", "too long", "spaced", "latin-1")]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in made) and len(set(made)) == len(made), made
    assert [sent[n][1] for n in ("given", "stream", "no key", "bad body", "no route", "big headers")] == \
        [200, 200, 401, 400, 404, 431]
    # Malformed HTTP never reaches the app: it gets an id and a line all the same.
    with socket.create_connection(_addr(keyed.url)) as s:
        s.sendall(b"NOT HTTP\r\n\r\n")
        status, headers, _ = _read_response(s)
        sent["malformed"] = (headers["x-request-id"], status, 0, None)
    # A stream whose client leaves after its first audio: 499.
    left = _send_with_key(keyed.url, {"input": TEXT, "max_audio_ms": 60000}, ENV_KEY)
    head = left.recv(4096)
    left_id = re.search(rb"x-request-id: (\w+)", head).group(1).decode()
    left.close()

    lines = _access_lines(keyed, [i for i, *_ in sent.values()] + [left_id])
    for name, (rid, status, audio, waited) in sent.items():
        line = lines[rid]
        assert line["status"] == status and line["level"] == "INFO", (name, line)
        speech_route = name in ("given", "stream", "bad body")
        assert line["route"] == {"no route": "/v1/nothing", "malformed": "-"}.get(
            name, "/v1/audio/speech" if speech_route or name == "no key" else "/health"), (name, line)
        assert line["text_chars"] == (len(TEXT) if speech_route else None), (name, line)
        if waited is not None:
            # (the server stops its clock after the last byte is out, a little after the client has it)
            assert 0 <= line["total_s"] <= waited + 0.5, (name, line)
        if status == 200 and speech_route:  # audio seconds exactly as received; first audio within the total
            assert abs(line["audio_s"] - audio / 24000) < 1e-4 and audio > 0, (name, line)
            assert 0 < line["first_audio_s"] <= line["total_s"] and 0 <= line["slot_wait_s"] <= line["total_s"]
        else:
            assert line["audio_s"] is line["first_audio_s"] is line["slot_wait_s"] is None, (name, line)
        assert line["error"] is None
    gone = lines[left_id]
    assert gone["status"] == 499 and gone["audio_s"] > 0 and 0 < gone["first_audio_s"] <= gone["total_s"], gone


def _send_with_key(url, body: dict, key: str) -> socket.socket:
    """A speech request on a socket of its own, nothing read: a client that may leave at any time."""
    data = json.dumps(body).encode()
    s = socket.create_connection(_addr(url))
    s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(data)) + data)
    return s


def _scrape(url, key=ENV_KEY) -> dict:
    """/metrics as {(sample name, labels): value}, read with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text[:300]
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def _value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def _moved(before, after, name, **labels) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _check_histogram(before, after, name, values):
    """The histogram `name` moved by exactly `values`: its count, its sum, and each bucket by the values at or
    under its bound (values within 1e-4 of a bound, as the access log rounds them, may fall either side)."""
    assert _moved(before, after, name + "_count") == len(values), (name, values)
    assert abs(_moved(before, after, name + "_sum") - sum(values)) < 1e-3 * max(1, len(values)), (name, values)
    bounds = [dict(labels)["le"] for (n, labels) in after if n == name + "_bucket"]
    assert "+Inf" in bounds and len(bounds) > 10, bounds
    for le in bounds:
        moved = _moved(before, after, name + "_bucket", le=le)
        bound = float(le)
        assert sum(v <= bound - 1e-4 for v in values) <= moved <= sum(v <= bound + 1e-4 for v in values), \
            (name, le, moved, values)


@pytest.mark.slow
def test_metrics_move_by_the_right_amounts(keyed):
    no_key = httpx.get(keyed.url + "/metrics")  # --metrics-auth is the default: a key is needed
    _error(no_key.status_code, no_key.headers["content-type"], no_key.content, 401, "no API key")
    # Nothing generating (a client that left before may still have its slot until the driver's next turn).
    _wait_health(keyed.url, lambda h: h["busy_slots"] == h["queued"] == 0)
    before = _scrape(keyed.url)
    key = {"Authorization": f"Bearer {ENV_KEY}"}
    # A 200 (whole), a stream, a 400.
    whole = httpx.post(keyed.url + "/v1/audio/speech", headers=key, timeout=300,
                       json={"input": "One whole answer.", "max_audio_ms": 320, "stream": False})
    stream = httpx.post(keyed.url + "/v1/audio/speech", headers=key, timeout=300,
                        json={"input": "One streamed answer.", "max_audio_ms": 480, "seed": 5})
    bad = httpx.post(keyed.url + "/v1/audio/speech", headers=key, json={"input": "Hi.", "topk": 0})
    assert [whole.status_code, stream.status_code, bad.status_code] == [200, 200, 400]
    served = [whole, stream]
    lines = _access_lines(keyed, [r.headers["x-request-id"] for r in (whole, stream, bad)])
    mid = _scrape(keyed.url)
    speech = "/v1/audio/speech"
    assert _moved(before, mid, "csm_requests_total", route=speech, status="200") == 2
    assert _moved(before, mid, "csm_requests_total", route=speech, status="400") == 1
    audio_s = sum(len(_wav(r.content)) for r in served) / 24000
    assert abs(_moved(before, mid, "csm_generated_audio_seconds_total") - audio_s) < 1e-6 and audio_s > 0
    done = [lines[r.headers["x-request-id"]] for r in served]
    _check_histogram(before, mid, "csm_speech_duration_seconds", [x["total_s"] for x in done])
    _check_histogram(before, mid, "csm_speech_first_audio_seconds", [x["first_audio_s"] for x in done])
    _check_histogram(before, mid, "csm_speech_slot_wait_seconds", [x["slot_wait_s"] for x in done])
    _check_histogram(before, mid, "csm_speech_real_time_factor", [x["total_s"] / x["audio_s"] for x in done])
    assert _moved(before, mid, "csm_engine_step_seconds_count") >= 2
    assert _moved(before, mid, "csm_prefill_rows_total") >= 2 * len("One whole answer.".split())
    for name in ("csm_deferred_admissions_total", "csm_engine_failures_total", "csm_engine_restarts_total",
                 "csm_warming", "csm_warmup_programs", "csm_warmup_programs_compiled"):
        assert (name, ()) in mid and _value(mid, name) == 0, name  # (no failure here; --no-warmup)
    assert _value(mid, "csm_slots") == 2 and _value(mid, "csm_slots_busy") == 0
    assert _value(mid, "process_resident_memory_bytes") > 0

    # Two streams hold both slots and have their first audio; two more wait; the next one gets 429. Then
    # all four clients leave (the waiting ones first): four 499s, two with audio and a slot, two without.
    def hold(name):
        return _send_with_key(keyed.url, {"input": f"A long answer {name}.", "max_audio_ms": 60000}, ENV_KEY)

    held = []
    for name in ("slot-1", "slot-2"):
        held.append(hold(name))
        assert b"200 OK" in held[-1].recv(4096)  # its headers come with its first audio
    held += [hold("wait-1"), hold("wait-2")]
    _wait_health(keyed.url, lambda h: h["queued"] == 2)
    full = _scrape(keyed.url)
    assert (_value(full, "csm_slots_busy"), _value(full, "csm_requests_waiting")) == (2, 2), full
    busy = httpx.post(keyed.url + "/v1/audio/speech", headers=key, json={"input": "Hi.", "max_audio_ms": 160})
    assert busy.status_code == 429
    for s in held[2:]:
        s.close()
    _wait_health(keyed.url, lambda h: h["queued"] == 0)
    for s in held[:2]:
        s.close()
    _wait_health(keyed.url, lambda h: h["busy_slots"] == 0)
    before_left = mid
    # The waiting ones never had a response, nor an id: their lines are found by their text's length.
    left = _wait_lines(keyed, lambda x: x["status"] == 499 and x["text_chars"] == len("A long answer slot-1."), 4)
    after = _scrape(keyed.url)
    assert _moved(before_left, after, "csm_requests_total", route=speech, status="499") == 4
    assert _moved(before_left, after, "csm_requests_total", route=speech, status="429") == 1
    assert _moved(before_left, after, "csm_requests_total", route=speech, status="200") == 0
    _check_histogram(before_left, after, "csm_speech_duration_seconds", [x["total_s"] for x in left])
    got_audio = [x for x in left if x["first_audio_s"] is not None]
    assert len(got_audio) == 2 and all(x["slot_wait_s"] is not None for x in got_audio), left
    _check_histogram(before_left, after, "csm_speech_first_audio_seconds", [x["first_audio_s"] for x in got_audio])
    _check_histogram(before_left, after, "csm_speech_slot_wait_seconds", [x["slot_wait_s"] for x in got_audio])
    _check_histogram(before_left, after, "csm_speech_real_time_factor", [])
    assert _moved(before_left, after, "csm_generated_audio_seconds_total") >= sum(x["audio_s"] for x in got_audio)


def _wait_health(url, ok, seconds=120):
    deadline = time.time() + seconds
    while not ok(h := httpx.get(url + "/health", timeout=30).json()):
        assert time.time() < deadline, h
        time.sleep(0.05)


def _wait_lines(server: Server, match, n, seconds=30) -> list:
    """The access lines that `match`, once there are `n`."""
    deadline = time.time() + seconds
    while True:
        lines = [json.loads(line) for line in server.text().splitlines() if line.strip()]
        found = [x for x in lines if x["logger"] == "csm_jax.access" and match(x)]
        if len(found) >= n or time.time() > deadline:
            assert len(found) == n, found
            return found
        time.sleep(0.2)


def _stream(url, body, out: list, key=ENV_KEY):
    """Streams a speech request into `out`: its status, its chunks' bytes, then "complete" (or the error)."""
    try:
        with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {key}"} if key else {}) as r:
            out.append(r.status_code)
            for chunk in r.iter_bytes():
                out.append(chunk)
        out.append("complete")
    except httpx.HTTPError as e:
        out.append(e)


@pytest.mark.slow
def test_sigterm_drains_then_exits_0(csm_dir, tmp_path_factory):
    """SIGTERM while two streams hold the slots and a request waits: new requests get 503 draining (with
    Retry-After), /health 503 "draining", a new conversation WebSocket 503; the streams finish in full (the
    same audio as before the drain) and the waiting request is served; then the process exits with 0. Also:
    --no-metrics-auth leaves /metrics open while the rest needs the key."""
    asr = _conversations_available()
    converse = ["converse", "--llm-url", "http://127.0.0.1:9/v1", "--asr-model", asr] if asr else []
    server = _launch(csm_dir, tmp_path_factory.mktemp("drain"), "--api-key", ENV_KEY, "--no-metrics-auth",
                     "--shutdown-grace", "120", *converse)
    url, key = server.url, {"Authorization": f"Bearer {ENV_KEY}"}
    try:
        assert httpx.get(url + "/v1/models").status_code == 401
        _scrape(url, key=None)  # open without a key
        bodies = [{"input": f"Stream number {i}.", "max_audio_ms": 2400, "seed": i} for i in range(2)]
        alone = [httpx.post(url + "/v1/audio/speech", headers=key, timeout=300, json={**b, "stream": False})
                 for b in bodies]
        assert all(r.status_code == 200 for r in alone)
        streams = [[], []]
        threads = [threading.Thread(target=_stream, args=(url, b, out)) for b, out in zip(bodies, streams)]
        for t in threads:
            t.start()
        _wait_health(url, lambda h: h["busy_slots"] == 2)
        waiting = {}
        threads.append(threading.Thread(target=lambda: waiting.setdefault("r", httpx.post(
            url + "/v1/audio/speech", headers=key, timeout=300,
            json={"input": "I waited.", "max_audio_ms": 320, "stream": False}))))
        threads[-1].start()
        _wait_health(url, lambda h: h["queued"] == 1)
        while not all(len(out) > 1 for out in streams):  # both have audio on the way
            time.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        while (h := httpx.get(url + "/health", timeout=30)).status_code == 200:
            assert time.time() < deadline, h.json()
            time.sleep(0.02)
        assert h.status_code == 503 and h.json()["status"] == "draining", h.json()
        r = httpx.post(url + "/v1/audio/speech", headers=key, json={"input": "Too late.", "max_audio_ms": 160})
        err = _error(r.status_code, r.headers["content-type"], r.content, 503, "draining")
        assert err["code"] == "draining" and r.headers["retry-after"] == "1", err
        if asr:
            import websockets
            from websockets.exceptions import InvalidStatus

            async def refused():
                with pytest.raises(InvalidStatus) as e:
                    await websockets.connect(url.replace("http", "ws") + "/v1/converse", additional_headers=key)
                return e.value.response.status_code

            assert asyncio.run(refused()) == 503
        assert server.proc.poll() is None  # still draining: the streams are not done
        for t in threads:
            t.join(timeout=300)
        for out, ref in zip(streams, alone):
            assert out[0] == 200 and out[-1] == "complete", out[-1:]
            pcm, want = _wav(b"".join(out[1:-1])), _wav(ref.content)
            assert pcm.shape == want.shape and np.abs(pcm.astype(int) - want.astype(int)).max() <= 1
        assert waiting["r"].status_code == 200 and len(_wav(waiting["r"].content)) > 0
        assert server.proc.wait(timeout=60) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    log = server.text()
    assert "draining: new requests get 503" in log and "nothing left in flight" in log, log[-3000:]


@pytest.mark.slow
def test_a_second_signal_exits_at_once(csm_dir, tmp_path_factory):
    """SIGTERM starts the drain; a Ctrl-C then exits at once (status 130), a stream in flight cut."""
    server = _launch(csm_dir, tmp_path_factory.mktemp("twice"), "--shutdown-grace", "120")
    out = []
    listener = threading.Thread(target=_stream, args=(server.url, {"input": "A long one.", "max_audio_ms": 60000},
                                                      out, None))
    listener.start()
    while len(out) < 2:
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    _wait_health(server.url, lambda h: h["status"] == "draining", 30)
    t0 = time.time()
    server.proc.send_signal(signal.SIGINT)
    status = server.proc.wait(timeout=30)
    listener.join(timeout=30)
    assert status == 130 and time.time() - t0 < 10, status  # not drained: it says so (as Ctrl-C does)
    assert out[-1] != "complete"
    assert "a second signal (Interrupt): exiting at once" in server.text() and "Traceback" not in server.text()
