"""The host's work per engine step, per slot, with the device stubbed: what the CPU must do beside each device
step, and how it compares with that step.

  python benchmarks/bench_host.py                        # 256, 640 and 1,024 slots
  python benchmarks/bench_host.py --slots 1024 --windows 5
  python benchmarks/bench_host.py --quick                # 8 slots, a few steps, every byte checked (tests)

The device is csm_jax.testing.stub_device's: every generation step takes the device time of the cost model
below (slept on the wall clock, so the host works beside it as beside a real device) and its results, of the
real shapes, are ready then. The real engine, driver and server run on them; N requests generate all along
(their caps beyond the run). Three parts, each in CPU seconds of this process (every thread):
  engine  the driver's thread steps the engine and hands each event to a sink that keeps nothing.
  server  the same inside the real server: create_app's POST /v1/audio/speech, N concurrent streaming (wav)
          requests driven in-process through ASGI, as uvicorn's h11 protocol calls the app (on uvicorn's event
          loop, uvloop when installed): everything from the driver's events to the response body's bytes,
          except writing them to a socket. Its share beyond the engine part is the server's fan-out.
  send    what writing a chunk to a socket adds: uvicorn with the server's own protocol
          (csm_jax.server.protocol) streaming chunks of one step's size to --readers clients in another
          process; this process's CPU seconds per chunk. One chunk per slot and step.
The engine and server parts are measured over --windows windows of --steps steps once every request has its
first audio, the send part --windows times; the least disturbed window counts (the machine may be shared).
Printed per N: microseconds per slot and step of each part, the host's milliseconds per step in all (engine +
server fan-out + N sends), the device step and the host's share of it. The last line is JSON.

With --check (and --quick) every byte the server sends is checked: the WAV header, then one chunk per step,
each the 16-bit PCM of its slot's stub PCM by the formula the server has always used, written out here apart
from the library (`reference_pcm16`: clipped to [-1, 1], times 32767, truncated), each request from one slot of
its own.

The device step (`device_step_s`) is simulate_serving.py's cost model of a generation step on the H100: F x (a
frame of generation + a Mimi decode step) at the rows the program computes, from the H100's measured figures
(its TABLES["h100"]; no H200 figures yet). --device-step-ms replaces it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

import numpy as np
import tyro

from csm_jax.audio import FRAME_MS, FRAME_SAMPLES
from csm_jax.engine import FRAMES_PER_CALL
from simulate_serving import TABLES, table_costs  # the serving simulation's device cost model

WAV_HEADER_BYTES = 44


@dataclasses.dataclass
class Args:
    slots: tuple[int, ...] = (256, 640, 1024)
    steps: int = 10
    """Steps in one measured window."""
    windows: int = 3
    """Windows measured per part and slot count; the least disturbed one counts."""
    frames_per_call: int = FRAMES_PER_CALL
    device_step_ms: Optional[float] = None
    """A generation step's device time (default: the H100 cost model by rows, see above)."""
    readers: int = 64
    """send: concurrent streams read from uvicorn."""
    chunks: int = 200
    """send: chunks each reader receives."""
    check: bool = False
    """Check every byte the server sends (kept in memory: for small slot counts)."""
    quick: bool = False
    """8 slots, 1 window of 3 steps, 4 readers of 20 chunks, --check: that it runs (the tests)."""


def device_step_s(rows: int, frames_per_call: int) -> float:
    """The H100 cost model's generation step: F x (a frame of generation + a Mimi decode step) at `rows`."""
    return table_costs(TABLES["h100"], frames_per_call)[0](rows)


def reference_pcm16(x: np.ndarray) -> bytes:
    """The server's 16-bit PCM as it has always been made, apart from the library: what --check expects."""
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


class Counted:
    """A stub device whose generation steps are counted: `wait(k)` blocks (no CPU) until k more have run."""

    def __init__(self, n: int, args: Args):
        from csm_jax.driver import Driver
        from csm_jax.engine import Engine
        from csm_jax.testing.stub_device import StubDevice, StubModel, WallClock

        F, clock = args.frames_per_call, WallClock()
        self.cond, self.steps = threading.Condition(), 0

        def generate_s(rows: int) -> float:
            with self.cond:
                self.steps += 1
                self.cond.notify_all()
            return args.device_step_ms / 1e3 if args.device_step_ms is not None else device_step_s(rows, F)

        self.device = StubDevice(n, F, clock, generate_s=generate_s)
        self.driver = Driver(Engine(StubModel(), n, F, clock=clock, programs=self.device))
        self.max_audio_ms = FRAME_MS * F * (args.windows * args.steps + 40)  # beyond the run

    def wait(self, k: int) -> None:
        with self.cond:
            target = self.steps + k
            self.cond.wait_for(lambda: self.steps >= target)

    def cpu_per_step(self, args: Args) -> float:
        """The least CPU seconds per step of this process over --windows windows of --steps steps."""
        best = float("inf")
        for _ in range(args.windows):
            self.wait(1)  # a window starts at a step's dispatch
            c0 = time.process_time()
            self.wait(args.steps)
            best = min(best, (time.process_time() - c0) / args.steps)
        return best


def engine_part(n: int, args: Args) -> float:
    from csm_jax.request import Request

    run, started, lock = Counted(n, args), threading.Event(), threading.Lock()
    firsts = set()

    def sink(i):
        def tell(ev):
            if ev.audio.size and i not in firsts:
                with lock:
                    firsts.add(i)
                    if len(firsts) == n:
                        started.set()
        return tell

    with run.driver as driver:
        for i in range(n):
            driver.submit(Request(f"request {i}", seed=i, max_audio_ms=run.max_audio_ms), sink(i))
        started.wait()
        return run.cpu_per_step(args)


def new_loop_factory():
    """The event loop uvicorn runs on ("auto": uvloop when installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop, "asyncio"
    return uvloop.new_event_loop, "uvloop"


def server_part(n: int, args: Args) -> tuple[float, dict]:
    """CPU seconds per step with the server's fan-out, and (with --check) what the check found."""
    from csm_jax.server import create_app

    run = Counted(n, args)
    app = create_app(run.driver, {}, warmup=False)
    body = json.dumps({"input": "Hello there.", "max_audio_ms": run.max_audio_ms, "response_format": "wav"}).encode()
    chunks: list[list[bytes]] = [[] for _ in range(n)]
    firsts, result = set(), {}

    async def request(i: int, everyone_started: asyncio.Event, gone: asyncio.Event):
        sent = False

        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] != "http.response.body":
                if message.get("status") != 200:
                    raise RuntimeError(f"request {i} was answered {message.get('status')}")
                return
            data = message.get("body", b"")
            if args.check:
                chunks[i].append(bytes(data))
            if len(data) > WAV_HEADER_BYTES and i not in firsts:  # its first audio (the header comes alone)
                firsts.add(i)
                if len(firsts) == n:
                    everyone_started.set()

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/audio/speech", "raw_path": b"/v1/audio/speech",
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 10000 + i),
                 "server": ("127.0.0.1", 8000),
                 "headers": [(b"host", b"127.0.0.1:8000"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode())]}
        await app(scope, receive, send)

    async def main():
        everyone_started, gone = asyncio.Event(), asyncio.Event()
        run.driver.start_thread()
        tasks = [asyncio.create_task(request(i, everyone_started, gone)) for i in range(n)]
        await everyone_started.wait()
        result["cpu"] = await asyncio.to_thread(run.cpu_per_step, args)
        run.driver.shutdown(0)  # the streams end cleanly
        await asyncio.gather(*tasks)
        gone.set()
        await asyncio.to_thread(run.driver.close)

    factory, _ = new_loop_factory()
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return result["cpu"], check_bytes(chunks, run.device.pcm, args) if args.check else {}


def check_bytes(chunks: list[list[bytes]], pcm: np.ndarray, args: Args) -> dict:
    """Every stream: the WAV header, then whole chunks of one step, each its slot's PCM as `reference_pcm16`
    makes it; each stream from a slot of its own."""
    step_bytes = args.frames_per_call * FRAME_SAMPLES * 2
    by_bytes = {reference_pcm16(row): s for s, row in enumerate(pcm)}
    slots, checked, bad = set(), 0, []
    for i, parts in enumerate(chunks):
        data = b"".join(parts)
        if data[:4] != b"RIFF" or (len(data) - WAV_HEADER_BYTES) % step_bytes:
            bad.append(f"request {i}: {len(data)} bytes, not a WAV header and whole steps")
            continue
        got = {by_bytes.get(data[k:k + step_bytes]) for k in range(WAV_HEADER_BYTES, len(data), step_bytes)}
        checked += (len(data) - WAV_HEADER_BYTES) // step_bytes
        if len(got) != 1 or None in got or got & slots:
            bad.append(f"request {i}: its chunks are not all its own slot's PCM as reference_pcm16 makes it")
        slots |= got
    return {"pcm16_exact": not bad and checked > 0, "chunks_checked": checked, "problems": bad[:5]}


READER = """
import asyncio, sys, httpx
async def one(client, url):
    n = 0
    async with client.stream("GET", url) as r:
        async for b in r.aiter_raw():
            n += len(b)
    return n
async def main(url, readers):
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=readers)) as client:
        print(sum(await asyncio.gather(*[one(client, url) for _ in range(readers)])))
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def send_part(args: Args) -> float:
    """CPU seconds of this process per chunk that uvicorn, as the server configures it, writes to a socket."""
    import uvicorn

    from csm_jax.server.protocol import header_timeout_protocol

    chunk = bytes(args.frames_per_call * FRAME_SAMPLES * 2)

    async def app(scope, receive, send):  # bare ASGI: only uvicorn's own work per chunk
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"audio/wav")]})
        for _ in range(args.chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=header_timeout_protocol(10.0), access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    best, want = float("inf"), args.readers * args.chunks * len(chunk)
    for _ in range(args.windows):
        c0 = time.process_time()
        out = subprocess.run([sys.executable, "-c", READER, f"http://127.0.0.1:{port}/", str(args.readers)],
                             capture_output=True, text=True, timeout=600)
        best = min(best, time.process_time() - c0)
        if out.returncode != 0 or out.stdout.split()[-1:] != [str(want)]:
            raise RuntimeError(f"the readers did not get all {want} bytes: {out.stdout[-300:]} {out.stderr[-1500:]}")
    server.should_exit = True
    thread.join(10)
    return best / (args.readers * args.chunks)


def main(args: Args) -> None:
    if args.quick:
        args = dataclasses.replace(args, slots=(8,), steps=3, windows=1, readers=4, chunks=20, check=True)
    F = args.frames_per_call
    _, loop = new_loop_factory()
    send = send_part(args)
    print(f"host work per step with a stubbed device: {os.cpu_count()} cores, CPU seconds of the process, "
          f"{F} frames a step, event loop {loop}; device step: " +
          (f"{args.device_step_ms:g} ms" if args.device_step_ms is not None else "the H100 cost model"))
    print(f"send (uvicorn h11, loopback): {send * 1e6:.1f} us per chunk of {F * FRAME_SAMPLES * 2} bytes "
          f"({args.readers} readers x {args.chunks} chunks)")
    print(f"{'slots':>6s} {'engine us/slot':>15s} {'fan-out us/slot':>16s} {'send us/slot':>13s} "
          f"{'host ms/step':>13s} {'device ms/step':>15s} {'host/device':>12s}")
    rows = []
    for n in args.slots:
        engine = engine_part(n, args)
        server, check = server_part(n, args)
        fan_out = server - engine
        host = server + n * send
        device = args.device_step_ms / 1e3 if args.device_step_ms is not None else device_step_s(n, F)
        row = {"slots": n, "engine_us_per_slot": round(engine / n * 1e6, 2),
               "fan_out_us_per_slot": round(fan_out / n * 1e6, 2), "send_us_per_slot": round(send * 1e6, 2),
               "host_ms_per_step": round(host * 1e3, 2), "device_ms_per_step": round(device * 1e3, 1),
               "host_share_of_step": round(host / device, 3), **check}
        rows.append(row)
        print(f"{n:6d} {row['engine_us_per_slot']:15.1f} {row['fan_out_us_per_slot']:16.1f} "
              f"{row['send_us_per_slot']:13.1f} {row['host_ms_per_step']:13.1f} {row['device_ms_per_step']:15.1f} "
              f"{100 * host / device:11.0f}%" + (f"  pcm16 exact: {check['pcm16_exact']}" if check else ""))
    print(json.dumps({"bench": "host", "cores": os.cpu_count(), "frames_per_call": F, "event_loop": loop,
                      "steps": args.steps, "windows": args.windows, "send_us_per_chunk": round(send * 1e6, 2),
                      "rows": rows}))


if __name__ == "__main__":
    main(tyro.cli(Args, description=__doc__))
