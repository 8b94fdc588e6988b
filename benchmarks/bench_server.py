"""Load on the speech server: N concurrent clients against a running server on loopback.

  python scripts/serve.py --checkpoint sesame/csm-1b --slots 8 &           # in another shell
  python benchmarks/bench_server.py --url http://127.0.0.1:8000 --clients 1 8 32 --requests 2

Each client sends `--requests` streaming requests one after another. Per concurrency level: time to the
first audio byte (p50, p95), seconds of audio delivered per wall-clock second, and failed requests (any
status but 200, or a broken stream). Prints a table and one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time

import numpy as np
import tyro


@dataclasses.dataclass
class Args:
    url: str = "http://127.0.0.1:8000"
    """Base URL of a running server (loopback)."""
    clients: tuple[int, ...] = (1, 8, 32)
    """Concurrency levels."""
    requests: int = 2
    """Requests per client per level."""
    text: str = "Hello! This is a short test of the speech server."
    voice: str = "default"
    max_audio_ms: int = 4000
    """Frame cap per request (an extension of the OpenAI body)."""


def one(args: Args, seed: int, out: list) -> None:
    import httpx

    body = {"model": "csm-1b", "input": args.text, "voice": args.voice, "response_format": "pcm",
            "seed": seed, "max_audio_ms": args.max_audio_ms}
    t0 = time.perf_counter()
    first, n = None, 0
    try:
        with httpx.stream("POST", args.url + "/v1/audio/speech", json=body, timeout=600) as r:
            if r.status_code != 200:
                out.append({"ok": False, "status": r.status_code})
                return
            for chunk in r.iter_bytes():
                if chunk and first is None:
                    first = time.perf_counter() - t0
                n += len(chunk)
    except Exception as e:  # noqa: BLE001 - any transport failure counts as a failed request
        out.append({"ok": False, "error": repr(e)})
        return
    out.append({"ok": True, "ttfb": first, "audio_s": n / 2 / 24000, "wall": time.perf_counter() - t0})


def level(args: Args, clients: int) -> dict:
    out: list = []

    def client(c):
        for i in range(args.requests):
            one(args, c * 1000 + i, out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in out if r["ok"]]
    ttfb = np.array([r["ttfb"] for r in ok if r["ttfb"] is not None])
    return {"clients": clients, "requests": len(out), "failed": len(out) - len(ok),
            "ttfb_p50_s": float(np.percentile(ttfb, 50)) if ttfb.size else None,
            "ttfb_p95_s": float(np.percentile(ttfb, 95)) if ttfb.size else None,
            "audio_s_per_wall_s": sum(r["audio_s"] for r in ok) / wall, "wall_s": wall}


def main(args: Args) -> None:
    import httpx

    health = httpx.get(args.url + "/health", timeout=10).json()
    rows = [level(args, c) for c in args.clients]
    print(f"server {args.url}: {health}")
    print(f"{'clients':>7s} {'reqs':>5s} {'failed':>6s} {'TTFB p50':>9s} {'TTFB p95':>9s} {'audio s/s':>10s}")
    for r in rows:
        fmt = lambda v: f"{v:9.2f}" if v is not None else f"{'-':>9s}"  # noqa: E731
        print(f"{r['clients']:7d} {r['requests']:5d} {r['failed']:6d} {fmt(r['ttfb_p50_s'])} {fmt(r['ttfb_p95_s'])} "
              f"{r['audio_s_per_wall_s']:10.2f}")
    print(json.dumps({"health": health, "levels": rows}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
