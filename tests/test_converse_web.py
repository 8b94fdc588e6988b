"""The /converse page in a real headless Chromium (a WAV as its microphone) against a real server process
with an API key (the page asks for it), and the WebSocket's faults: a client that goes away mid-reply frees
its conversation; bad messages."""

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import soundfile as sf

from converse_fixtures import require, speak
from llm_fixtures import REPLY
from test_server import _start

ROOT = Path(__file__).resolve().parents[1]
PLAYWRIGHT = ROOT / ".cache" / "node" / "node_modules" / "playwright-core"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
KEY = "page/key+1="  # base64's own characters: the page must encode it for the WebSocket's subprotocol
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(csm_dir, tmp_path_factory, llm_server, asr_model):
    proc, url = _start(csm_dir, tmp_path_factory, "converse", "--llm-url", llm_server.url, "--llm-model",
                       llm_server.model, "--asr-model", asr_model, "--max-sentence-ms", "2000",
                       "--max-conversations", "1", "--api-key", KEY)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def turn_wav(tmp_path_factory):
    return speak("Please tell me about the weather today.", tmp_path_factory.mktemp("web") / "turn.wav", 3.0)


def browse(server, wav, mode, keys=(KEY,)):
    require("Chromium", CHROMIUM is not None, "apt-get install chromium")
    require("playwright-core", PLAYWRIGHT.is_dir(), "bash scripts/test.sh installs it into .cache/node")
    env = dict(os.environ, PLAYWRIGHT_CORE_DIR=str(PLAYWRIGHT))
    r = subprocess.run(["node", str(ROOT / "tests" / "browser" / "converse_page.mjs"), server + "/converse",
                        str(wav), CHROMIUM, "300000", mode, ",".join(keys)], capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_conversation_options_only_with_the_converse_subcommand():
    """serve.py's own options do not include the twenty of conversations; `serve.py converse` has them."""
    def help_text(*args):
        r = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), *args, "--help"],
                           capture_output=True, text=True, timeout=120, env=dict(os.environ, COLUMNS="200"))
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    plain, converse = help_text(), help_text("converse")
    flags = ("--llm-url STR", "--asr-model STR", "--voice-text {None}|STR", "--max-conversations INT")
    assert "--slots INT" in plain and "converse" in plain and not any(f in plain for f in flags)
    assert "--slots INT" in converse and all(f in converse for f in flags)


def wait_free(server, seconds=30):
    deadline = time.time() + seconds
    while httpx.get(server + "/health").json()["conversations"] != 0:
        assert time.time() < deadline, "the conversation was not freed after the client went away"
        time.sleep(0.2)


@pytest.mark.slow
def test_page_in_chromium_talks_and_shows_the_transcript(server, turn_wav):
    page = browse(server, turn_wav, "converse", keys=("wrong-key", KEY))
    assert page["errors"] == 0 and page["turns"] == 1, page
    # It asked for the key, again after a wrong one, and not when started a second time; no URL carried it.
    assert page["keyPrompts"] == 2 and "Listening" in page["status"], page
    forms = (KEY, quote(KEY, safe=""), base64.urlsafe_b64encode(KEY.encode()).decode().rstrip("="))
    assert page["urls"] and not [u for u in page["urls"] if any(f in u for f in forms)], page["urls"]
    assert "weather" in page["user"][0].lower() and "today" in page["user"][0].lower()
    assert " ".join(t.removeprefix("CSM: ") for t in page["reply"]) == REPLY
    assert page["audioBytes"] > 2 * 1920  # 16-bit PCM of at least one 80 ms frame arrived and was played
    wait_free(server)  # the closed page freed its conversation


@pytest.mark.slow
def test_browser_closed_mid_reply_frees_the_conversation(server, turn_wav):
    before = httpx.get(server + "/health").json()["conversations_closed_mid_reply"]
    page = browse(server, turn_wav, "vanish")
    assert page["audioBytes"] > 0 and page["errors"] == 0  # it went away when the reply had begun to stream
    wait_free(server)
    assert httpx.get(server + "/health").json()["conversations_closed_mid_reply"] == before + 1


async def _ws(url):
    import websockets

    return await websockets.connect(url.replace("http", "ws") + "/v1/converse", max_size=None, additional_headers=AUTH)


@pytest.mark.slow
def test_disconnect_mid_reply_frees_the_conversation(server, turn_wav):
    audio, sr = sf.read(str(turn_wav), dtype="float32")

    async def run():
        ws = await _ws(server)
        await ws.send(json.dumps({"type": "start", "sample_rate": sr}))
        assert json.loads(await ws.recv()) == {"type": "ready"}
        # One conversation at most: a second client is refused with a clear reason while this one lives.
        other = await _ws(server)
        with pytest.raises(Exception) as e:
            await other.recv()
        assert "conversations are in use" in str(e.value)
        for i in range(0, audio.size, sr // 10):
            await ws.send(audio[i:i + sr // 10].astype("<f4").tobytes())
        kinds = []
        while True:  # wait until reply audio streams, then vanish
            msg = await asyncio.wait_for(ws.recv(), 300)
            if isinstance(msg, bytes):
                break
            kinds.append(json.loads(msg)["type"])
        assert "user" in kinds and "reply" in kinds
        assert httpx.get(server + "/health").json()["conversations"] == 1
        ws.transport.abort()  # the client is gone without a goodbye

    before = httpx.get(server + "/health").json()["conversations_closed_mid_reply"]
    asyncio.run(run())
    wait_free(server)
    assert httpx.get(server + "/health").json()["conversations_closed_mid_reply"] == before + 1
    # ...and the server still talks to the next client.
    assert httpx.post(server + "/v1/audio/speech", json={"input": "Still here.", "max_audio_ms": 160},
                      headers=AUTH, timeout=300).status_code == 200


def test_bad_messages_get_clear_errors(server):
    async def run():
        ws = await _ws(server)
        await ws.send(json.dumps({"type": "start"}))
        msg = json.loads(await ws.recv())
        assert msg["type"] == "error" and "sample_rate" in msg["message"]
        ws = await _ws(server)
        await ws.send(b"\x00" * 64)  # audio before the start message
        msg = json.loads(await ws.recv())
        assert msg["type"] == "error" and "first" in msg["message"]
        ws = await _ws(server)
        await ws.send(json.dumps({"type": "start", "sample_rate": 16000}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(b"\x00\x01\x02")
        assert "multiple of 4 bytes" in json.loads(await ws.recv())["message"]
        await ws.send(np.array([np.nan] * 160, "<f4").tobytes())
        assert "NaN" in json.loads(await ws.recv())["message"]
        await ws.send("hello")
        assert "unknown message" in json.loads(await ws.recv())["message"]
        await ws.send(np.zeros(16000, "<f4").tobytes())  # a second of silence, then the button is released
        await ws.send(json.dumps({"type": "end_turn"}))
        assert json.loads(await ws.recv()) == {"type": "no_words"}
        await ws.close()

    asyncio.run(run())


def test_push_to_talk_end_turn(server, turn_wav):
    wait_free(server)  # the one conversation the server takes: the test before closed its own a moment ago
    audio, sr = sf.read(str(turn_wav), dtype="float32")
    speech = audio[: int(np.flatnonzero(np.abs(audio) > 0.01)[-1]) + sr // 20]  # no trailing silence for VAD

    async def run():
        ws = await _ws(server)
        await ws.send(json.dumps({"type": "start", "sample_rate": sr}))
        assert json.loads(await ws.recv())["type"] == "ready"
        await ws.send(speech.astype("<f4").tobytes())
        await ws.send(json.dumps({"type": "end_turn"}))  # the button was released: the turn ends now
        events = []
        while "turn" not in events:
            msg = await asyncio.wait_for(ws.recv(), 300)
            if not isinstance(msg, bytes):
                m = json.loads(msg)
                events.append(m["type"])
                if m["type"] == "user":
                    assert "weather" in m["text"].lower()
        assert "user" in events and "reply" in events and "error" not in events
        await ws.close()

    asyncio.run(run())
