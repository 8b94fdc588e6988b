"""Load on the speech server: N concurrent streaming clients on loopback, per concurrency level.

  python benchmarks/bench_server.py --checkpoint path/to/csm-1b --slots 256 --clients 1 64 256
  python benchmarks/bench_server.py --url http://127.0.0.1:8000 --clients 1 8 32   # a server already running

With --checkpoint the benchmark starts `scripts/serve.py` itself (warm-up included: it waits until /health says
ok) and stops it at the end; any csm checkpoint folder works, e.g. a random full-size one. Each client sends
`--requests` streaming requests one after another. Per level: time to the first audio byte (p50, p95, p99),
seconds of audio delivered per wall-clock second, failed requests (any status but 200, or a broken stream),
and real-time streams: requests whose every byte arrived no later than its playback time, playback starting
`--start-buffer-ms` after the first byte. Prints a table and one JSON line.
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
           "--max-queue", str(args.max_queue)]
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
    proc = None
    if args.checkpoint is not None:
        proc, url = start_server(args)
    else:
        url = args.url
    try:
        health = httpx.get(url + "/health", timeout=10).json()
        rows = [level(args, url, c) for c in args.clients]
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    print(f"server {url}: {health}")
    print(f"{'clients':>7s} {'reqs':>5s} {'failed':>6s} {'TTFB p50':>9s} {'TTFB p95':>9s} {'TTFB p99':>9s} "
          f"{'audio s/s':>10s} {'real-time':>10s}")
    for r in rows:
        fmt = lambda v: f"{v:9.3f}" if v is not None else f"{'-':>9s}"  # noqa: E731
        print(f"{r['clients']:7d} {r['requests']:5d} {r['failed']:6d} {fmt(r['ttfb_p50_s'])} {fmt(r['ttfb_p95_s'])} "
              f"{fmt(r['ttfb_p99_s'])} {r['audio_s_per_wall_s']:10.2f} {r['real_time_streams']:10d}")
    print(json.dumps({"health": health, "levels": rows}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
