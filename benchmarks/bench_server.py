"""Load on the speech server: N concurrent streaming clients on loopback, per concurrency level.

  python benchmarks/bench_server.py --checkpoint path/to/csm-1b --slots 256 --clients 1 64 256
  python benchmarks/bench_server.py --url http://127.0.0.1:8000 --clients 1 8 32   # a server already running

With --checkpoint the benchmark starts `scripts/serve.py` itself (warm-up included: it waits until /health says
ok) and stops it at the end; any csm checkpoint folder works, e.g. a random full-size one. Each client sends
`--requests` streaming requests one after another. Per level: time to the first audio byte (p50, p95, p99),
seconds of audio delivered per wall-clock second, failed requests (any status but 200, or a broken stream),
and real-time streams: requests whose every byte arrived no later than its playback time, playback starting
`--start-buffer-ms` after the first byte. Prints a table and one JSON line, with the server's /health after
the run (e.g. `deferred_admissions`: steps at which the engine's schedule held a waiting request back to keep
running streams ahead of their playback).

  python benchmarks/bench_server.py --checkpoint path/to/csm-1b --slots 80 --conversations 64 \
      --turn-audio turn.wav --asr-model path/to/whisper-tiny.en

`--conversations N`: N concurrent conversations over /v1/converse (the server is started with the `converse`
subcommand; needs the converse extra and a speech recognizer), each sending `--turns` push-to-talk turns of
`--turn-audio` (spoken words, any rate) and waiting for the reply. Without `--llm-url` a stub LLM on loopback
answers every turn at once with a fixed sentence. Per turn: the client's end of turn to the first reply audio,
and the server's stages: speech recognition, the LLM's first sentence, and CSM's own part (first audio minus
the LLM's first sentence), each p50 and p95.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

BYTES_PER_SECOND = 2 * 24000  # 16-bit mono PCM at 24 kHz


@dataclasses.dataclass
class Args:
    url: Optional[str] = None
    """Base URL of a running server (loopback). Without it, --checkpoint starts one."""
    checkpoint: Optional[str] = None
    """Start scripts/serve.py on this checkpoint (hub id or folder) for the run."""
    slots: int = 64
    """--slots of the started server."""
    frames_per_call: int = 4
    """--frames-per-call of the started server."""
    max_queue: int = 1024
    """--max-queue of the started server."""
    clients: tuple[int, ...] = (1, 8, 32)
    """Concurrency levels."""
    requests: int = 2
    """Requests per client per level."""
    text: str = "Hello! This is a short test of the speech server."
    voice: str = "default"
    max_audio_ms: int = 4000
    """Frame cap per request (an extension of the OpenAI body)."""
    start_buffer_ms: int = 300
    """Playback of a stream starts this long after its first byte (for the real-time count)."""
    startup_timeout: float = 1800.0
    """Seconds to wait for a started server to finish warming up."""
    warmup: bool = True
    """Warm the started server up before measuring; --no-warmup starts sooner but compiles while serving (the
    first requests' figures then include compile time: for checking that the benchmark runs, not for figures)."""
    conversations: int = 0
    """Run N concurrent conversations instead of plain requests (see above)."""
    turns: int = 2
    """Turns per conversation."""
    turn_audio: Optional[Path] = None
    """A recording of spoken words for each user turn (conversations)."""
    asr_model: str = "tiny.en"
    """--asr-model of the started server (conversations)."""
    llm_url: Optional[str] = None
    """An OpenAI-compatible LLM for the started server; default: a stub on loopback (conversations)."""
    llm_model: str = "stub"


def one(args: Args, url: str, seed: int, out: list) -> None:
    import httpx

    body = {"model": "csm-1b", "input": args.text, "voice": args.voice, "response_format": "pcm",
            "seed": seed, "max_audio_ms": args.max_audio_ms}
    t0 = time.perf_counter()
    first, n, late = None, 0, 0.0
    try:
        with httpx.stream("POST", url + "/v1/audio/speech", json=body, timeout=600) as r:
            if r.status_code != 200:
                out.append({"ok": False, "status": r.status_code})
                return
            for chunk in r.iter_bytes():
                if not chunk:
                    continue
                now = time.perf_counter() - t0
                if first is None:
                    first = now
                # This chunk's first sample plays at first + buffer + (audio before it): how late did it come?
                due = first + args.start_buffer_ms / 1000 + n / BYTES_PER_SECOND
                late = max(late, now - due)
                n += len(chunk)
    except Exception as e:  # noqa: BLE001 - any transport failure counts as a failed request
        out.append({"ok": False, "error": repr(e)})
        return
    out.append({"ok": True, "ttfb": first, "audio_s": n / BYTES_PER_SECOND, "wall": time.perf_counter() - t0,
                "real_time": first is not None and late <= 0, "worst_late_s": late})


def level(args: Args, url: str, clients: int) -> dict:
    out: list = []

    def client(c):
        for i in range(args.requests):
            one(args, url, c * 1000 + i, out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in out if r["ok"]]
    ttfb = np.array([r["ttfb"] for r in ok if r["ttfb"] is not None])
    pct = lambda q: float(np.percentile(ttfb, q)) if ttfb.size else None  # noqa: E731
    return {"clients": clients, "requests": len(out), "failed": len(out) - len(ok),
            "ttfb_p50_s": pct(50), "ttfb_p95_s": pct(95), "ttfb_p99_s": pct(99),
            "audio_s_per_wall_s": sum(r["audio_s"] for r in ok) / wall,
            "real_time_streams": sum(r["real_time"] for r in ok), "wall_s": wall}


STUB_REPLY = "Sure, here is a short answer for you."


def start_stub_llm() -> str:
    """An OpenAI-compatible /v1/chat/completions on loopback that streams STUB_REPLY at once (its time is not
    what this benchmark measures). Returns its base URL."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            chunk = {"choices": [{"index": 0, "delta": {"content": STUB_REPLY}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/v1"


def conversation(args: Args, url: str, audio: np.ndarray, sr: int, out: list) -> None:
    import asyncio

    import websockets

    async def run():
        async with websockets.connect(url.replace("http", "ws", 1) + "/v1/converse", max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": sr}))
            if json.loads(await ws.recv()).get("type") != "ready":
                raise RuntimeError("the server did not start the conversation")
            for _ in range(args.turns):
                await ws.send(audio.astype("<f4").tobytes())
                await ws.send(json.dumps({"type": "end_turn"}))
                t_end, first, log = time.perf_counter(), None, None
                while log is None:
                    msg = await asyncio.wait_for(ws.recv(), 600)
                    if isinstance(msg, bytes):
                        first = first if first is not None else time.perf_counter() - t_end
                        continue
                    m = json.loads(msg)
                    if m["type"] in ("error", "no_words"):
                        raise RuntimeError(f"turn failed: {m}")
                    if m["type"] == "turn":
                        log = m["log"]
                lat = log.get("latency", {})
                out.append({"ok": first is not None and not log.get("error"), "end_to_audio_s": first,
                            "asr_s": lat.get("asr_s"), "llm_s": lat.get("llm_first_sentence_s"),
                            "csm_s": (lat["first_audio_s"] - lat["llm_first_sentence_s"])
                            if "first_audio_s" in lat and "llm_first_sentence_s" in lat else None})

    try:
        asyncio.run(run())
    except Exception as e:  # noqa: BLE001 - a failed conversation counts as failed turns
        out.append({"ok": False, "error": repr(e)})


def conversation_level(args: Args, url: str, n: int) -> dict:
    import soundfile as sf

    audio, sr = sf.read(str(args.turn_audio), dtype="float32", always_2d=True)
    audio = audio.mean(1)
    out: list = []
    threads = [threading.Thread(target=conversation, args=(args, url, audio, sr, out)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in out if r["ok"]]
    row = {"conversations": n, "turns": len(out), "failed": len(out) - len(ok)}
    for key in ("end_to_audio_s", "asr_s", "llm_s", "csm_s"):
        v = np.array([r[key] for r in ok if r.get(key) is not None])
        row[f"{key}_p50"] = float(np.percentile(v, 50)) if v.size else None
        row[f"{key}_p95"] = float(np.percentile(v, 95)) if v.size else None
    return row


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: Args) -> tuple[subprocess.Popen, str]:
    """scripts/serve.py on a free loopback port; returns once /health says ok (after its warm-up)."""
    import httpx

    port = free_port()
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "scripts" / "serve.py"), "--checkpoint", args.checkpoint, "--port", str(port),
           "--slots", str(args.slots), "--frames-per-call", str(args.frames_per_call),
           "--max-queue", str(args.max_queue)] + ([] if args.warmup else ["--no-warmup"])
    if args.conversations:
        cmd += ["converse", "--max-conversations", str(args.conversations), "--asr-model", args.asr_model,
                "--llm-url", args.llm_url or start_stub_llm(), "--llm-model", args.llm_model]
    log_path = Path(tempfile.gettempdir()) / "bench_server.log"
    log = open(log_path, "w")
    print(f"starting {' '.join(cmd[1:])} (log: {log_path})", flush=True)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < args.startup_timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=5).json().get("status") == "ok":
                print(f"server ready after {time.monotonic() - t0:.1f} s (start-up and warm-up)", flush=True)
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"the server was not ready within {args.startup_timeout:.0f} s; see {log_path}")


def main(args: Args) -> None:
    import httpx

    if (args.url is None) == (args.checkpoint is None):
        raise SystemExit("give --url (a running server) or --checkpoint (start one), not both")
    if args.conversations and args.turn_audio is None:
        raise SystemExit("--conversations needs --turn-audio: a recording of spoken words for the user turns")
    proc = None
    if args.checkpoint is not None:
        proc, url = start_server(args)
    else:
        url = args.url
    try:
        if args.conversations:
            row = conversation_level(args, url, args.conversations)
        else:
            rows = [level(args, url, c) for c in args.clients]
        health = httpx.get(url + "/health", timeout=10).json()  # after the run: its counters cover it
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"server {url}: {health}")
    if args.conversations:
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(f"{row['conversations']} conversations, {row['turns']} turns, {row['failed']} failed")
        for key, name in (("end_to_audio_s", "end of turn -> first audio (client)"), ("asr_s", "speech recognition"),
                          ("llm_s", "end of turn -> LLM's first sentence"), ("csm_s", "CSM: first sentence -> audio")):
            print(f"  {name:40s} p50 {fmt(row[key + '_p50'])} s   p95 {fmt(row[key + '_p95'])} s")
        print(json.dumps({"health": health, "conversations": row}))
        return
    print(f"{'clients':>7s} {'reqs':>5s} {'failed':>6s} {'TTFB p50':>9s} {'TTFB p95':>9s} {'TTFB p99':>9s} "
          f"{'audio s/s':>10s} {'real-time':>10s}")
    for r in rows:
        fmt = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9s}"  # noqa: E731
        print(f"{r['clients']:7d} {r['requests']:5d} {r['failed']:6d} {fmt(r['ttfb_p50_s'])} {fmt(r['ttfb_p95_s'])} "
              f"{fmt(r['ttfb_p99_s'])} {r['audio_s_per_wall_s']:10.2f} {r['real_time_streams']:10d}")
    print(json.dumps({"health": health, "levels": rows}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
