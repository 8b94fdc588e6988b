"""Load on the speech server: N concurrent streaming clients on loopback, per concurrency level.

  python benchmarks/bench_server.py --checkpoint path/to/csm-1b --slots 256 --clients 1 64 256
  python benchmarks/bench_server.py --url http://127.0.0.1:8000 --clients 1 8 32   # a server already running

With --checkpoint the benchmark starts `scripts/serve.py` itself (warm-up included: it waits until /health says
ok; its output goes to --server-log) and stops it at the end; any csm checkpoint folder works, e.g. a random
full-size one. A server that exits, reports an error on /health, or whose engine thread dies while it warms up
ends the benchmark within a second or two (exit status 1, the cause and the log's last lines printed), never
after the whole --startup-timeout. Each client sends `--requests` streaming requests one after another. Per
level: time to the first audio byte (p50, p95, p99), seconds of audio delivered per wall-clock second, failed
requests and why, and real-time streams: requests whose every byte arrived no later than its playback time,
playback starting `--start-buffer-ms` after the first byte. Prints a table and one JSON line, with the server's
/health after the run (e.g. `deferred_admissions`: steps at which the engine's schedule held a waiting request
back to keep running streams ahead of their playback). With `--figures PATH` each figure (the server ready,
then each level) is also appended to PATH as one JSON line the moment it is measured.

A request fails when its status is not 200, when its stream is cut (the server ends a stream it cannot finish
by closing the connection without the chunked body's last chunk: the client sees a transport error), or when
its audio is not what it asked for: whole 80 ms frames (3,840 bytes of 16-bit PCM each), no more than
`--max-audio-ms`, and, with `--full-length` (the default), exactly that many. A request ends before its cap
only at end of speech (a frame whose 32 codes are all 0): random weights practically never make one (each
code is one of 2,048), so with a random checkpoint a short stream is a truncation. With a trained checkpoint,
which ends its speech when the text is said, pass `--no-full-length`: a short stream that ends properly is
then counted as ended by speech (`ended_early`), not as a failure.

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
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

BYTES_PER_SECOND = 2 * 24000  # 16-bit mono PCM at 24 kHz
FRAME_MS = 80  # one CSM frame: 1920 samples (csm_jax.audio.FRAME_MS; not imported: this client needs no jax)
FRAME_BYTES = BYTES_PER_SECOND * FRAME_MS // 1000


@dataclasses.dataclass
class Args:
    url: Optional[str] = None
    """Base URL of a running server (loopback). Without it, --checkpoint starts one."""
    checkpoint: Optional[str] = None
    """Start scripts/serve.py on this checkpoint (hub id or folder) for the run."""
    slots: str = "64"
    """--slots of the started server (a number, or whatever else its --slots takes)."""
    frames_per_call: int = 4  # csm_jax.engine.FRAMES_PER_CALL (not imported: this client needs no jax)
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
    server_log: Optional[Path] = None
    """Where the started server's output goes; default: a new file in the system's temp folder (its name is
    printed)."""
    figures: Optional[Path] = None
    """Append each figure to this file as one JSON line as soon as it is measured (the server ready, each level)."""
    at_most_slots: bool = False
    """Cap each level at the server's slot count (/health `slots`): e.g. --clients 1000 on a server that holds
    640 slots runs 640 concurrent streams."""
    full_length: bool = True
    """Every request must deliver exactly --max-audio-ms of audio (right for random weights, which practically
    never end their speech); --no-full-length counts a short stream that ends properly as ended by speech."""
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


def http_client(url: str):
    """A client for one thread's requests: threads sharing one client's connection pool saw connections fail and
    waits of seconds at 1,000 streams (httpx, loopback); a client that loads the TLS certificates (~50 ms of CPU
    each) spread 1,000 clients over half a minute, so plain http loads none."""
    import httpx

    return httpx.Client(timeout=600, verify=not url.startswith("http:"))


def one(args: Args, url: str, seed: int, http) -> dict:
    """One streaming request on `http` (an http_client): its outcome, with `start` (perf_counter) and, when it
    failed, `why`."""
    body = {"model": "csm-1b", "input": args.text, "voice": args.voice, "response_format": "pcm",
            "seed": seed, "max_audio_ms": args.max_audio_ms}
    t0 = time.perf_counter()
    first, n, late = None, 0, 0.0
    try:
        with http.stream("POST", url + "/v1/audio/speech", json=body) as r:
            if r.status_code != 200:
                return {"ok": False, "start": t0, "why": f"status {r.status_code}"}
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
    except Exception as e:  # noqa: BLE001 - any transport failure (a stream cut short included) is a failure
        return {"ok": False, "start": t0, "why": f"transport: {type(e).__name__}", "error": repr(e)[:300], "bytes": n}
    why = audio_problem(n, args.max_audio_ms // FRAME_MS, args.full_length)
    if why:
        return {"ok": False, "start": t0, "why": why, "bytes": n}
    return {"ok": True, "start": t0, "ttfb": first, "audio_s": n / BYTES_PER_SECOND, "wall": time.perf_counter() - t0,
            "real_time": first is not None and late <= 0, "worst_late_s": late,
            "ended_early": n < args.max_audio_ms // FRAME_MS * FRAME_BYTES}


def audio_problem(n_bytes: int, frames_asked: int, full_length: bool) -> str | None:
    """Why a properly ended stream of `n_bytes` of PCM is not the audio its request asked for (None: it is)."""
    if n_bytes % FRAME_BYTES:
        return "not whole frames"
    if n_bytes > frames_asked * FRAME_BYTES:
        return "longer than asked"
    if full_length and n_bytes < frames_asked * FRAME_BYTES:
        return "short"  # see the module docstring: --no-full-length for a checkpoint that ends its speech
    return None


def level(args: Args, url: str, clients: int) -> dict:
    out: list = []
    go = threading.Barrier(clients + 1)  # the threads are started first, then all clients begin at once

    def client(c):
        with http_client(url) as http:
            go.wait()
            for i in range(args.requests):
                out.append({**one(args, url, c * 1000 + i, http), "first": i == 0})

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in out if r["ok"]]
    ttfb = np.array([r["ttfb"] for r in ok if r["ttfb"] is not None])
    pct = lambda q: float(np.percentile(ttfb, q)) if ttfb.size else None  # noqa: E731
    starts = [r["start"] for r in out if r["first"]]
    return {"clients": clients, "requests": len(out), "failed": len(out) - len(ok),
            # how far apart this client sent the clients' first requests (they are meant to arrive together)
            "start_spread_s": max(starts) - min(starts),
            "failures": dict(Counter(r["why"] for r in out if not r["ok"])),
            "ended_early": sum(r["ended_early"] for r in ok),
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


class ServerFailed(RuntimeError):
    """The started server exited, reported an error, or never became ready."""


def start_server(args: Args) -> tuple[subprocess.Popen, str, dict]:
    """scripts/serve.py on a free loopback port; returns (process, url, /health) once /health says ok (after its
    warm-up). Raises ServerFailed as soon as the server exits, /health says error, or its engine thread dies
    while warming (its traceback in the log; /health would say "warming" for ever)."""
    import httpx

    port = free_port()
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "scripts" / "serve.py"), "--checkpoint", args.checkpoint, "--port", str(port),
           "--slots", str(args.slots), "--frames-per-call", str(args.frames_per_call),
           "--max-queue", str(args.max_queue)] + ([] if args.warmup else ["--no-warmup"])
    if args.conversations:
        cmd += ["converse", "--max-conversations", str(args.conversations), "--asr-model", args.asr_model,
                "--llm-url", args.llm_url or start_stub_llm(), "--llm-model", args.llm_model]
    if args.server_log is None:
        fd, name = tempfile.mkstemp(prefix="bench_server-", suffix=".log")
        os.close(fd)
        args.server_log = Path(name)
    args.server_log.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.server_log
    print(f"starting {' '.join(cmd[1:])} (log: {log_path})", flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"

    def fail(why: str):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        tail = "".join(log_path.read_text(errors="replace").splitlines(True)[-15:])
        raise ServerFailed(f"{why} after {time.monotonic() - t0:.1f} s; the end of {log_path}:\n{tail}")

    t0, seen = time.monotonic(), 0
    while time.monotonic() - t0 < args.startup_timeout:
        if proc.poll() is not None:
            fail(f"the server exited with code {proc.returncode}")
        with open(log_path, errors="replace") as f:  # what was written since the last look (and a little before)
            f.seek(max(0, seen - 40))
            new = f.read()
            seen = f.tell()
        if "Exception in thread" in new:  # a thread died with a traceback (the engine's, warming up)
            fail("a thread of the server died")
        try:
            r = httpx.get(url + "/health", timeout=5)
            health = r.json()
        except (httpx.HTTPError, ValueError):
            health = {}
        if health.get("status") == "ok":
            ready = time.monotonic() - t0
            print(f"server ready after {ready:.1f} s (start-up and warm-up)", flush=True)
            return proc, url, {**health, "ready_s": ready}
        if health.get("status") == "error":
            fail(f"/health says error: {health.get('error')}")
        time.sleep(0.5)
    fail(f"the server was not ready within {args.startup_timeout:.0f} s")


def raise_open_files_limit() -> None:
    """Each concurrent stream holds a socket in this process and in the server (which inherits the limit):
    a level of 1,000 streams needs more than the usual soft limit of 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))


def record(args: Args, figure: str, **values) -> None:
    """One figure as a JSON line appended to --figures, at once (a run cut short keeps what it measured)."""
    if args.figures is None:
        return
    with open(args.figures, "a") as f:
        f.write(json.dumps({"stage": "conversations" if args.conversations else "server", "event": "figure",
                            "figure": figure, "time": round(time.time(), 3), **values}) + "\n")


def main(args: Args) -> None:
    import httpx

    if (args.url is None) == (args.checkpoint is None):
        raise SystemExit("give --url (a running server) or --checkpoint (start one), not both")
    if args.conversations and args.turn_audio is None:
        raise SystemExit("--conversations needs --turn-audio: a recording of spoken words for the user turns")
    if args.max_audio_ms < FRAME_MS:
        raise SystemExit(f"--max-audio-ms must be at least {FRAME_MS} (one frame)")
    raise_open_files_limit()
    proc = None
    if args.checkpoint is not None:
        try:
            proc, url, ready = start_server(args)
        except ServerFailed as e:
            record(args, "error", error=str(e)[:2000], server_log=str(args.server_log))
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        record(args, "ready", ready_s=ready.pop("ready_s"), health=ready, server_log=str(args.server_log),
               slots_asked=str(args.slots))
    else:
        url = args.url
        ready = httpx.get(url + "/health", timeout=10).json()
    try:
        if args.conversations:
            row = conversation_level(args, url, args.conversations)
            record(args, "conversations", **row)
        else:
            rows = []
            for c in args.clients:
                if args.at_most_slots and ready.get("slots"):
                    c = min(c, ready["slots"])
                print(f"level: {c} concurrent clients x {args.requests} request(s)", flush=True)
                rows.append(level(args, url, c))
                record(args, "level", **rows[-1])
                print(json.dumps(rows[-1]), flush=True)
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
          f"{'audio s/s':>10s} {'real-time':>10s} {'ended early':>11s}")
    for r in rows:
        fmt = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9s}"  # noqa: E731
        print(f"{r['clients']:7d} {r['requests']:5d} {r['failed']:6d} {fmt(r['ttfb_p50_s'])} {fmt(r['ttfb_p95_s'])} "
              f"{fmt(r['ttfb_p99_s'])} {r['audio_s_per_wall_s']:10.2f} {r['real_time_streams']:10d} "
              f"{r['ended_early']:11d}" + (f"   failures: {r['failures']}" if r["failures"] else ""))
    print(json.dumps({"health": health, "levels": rows}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
