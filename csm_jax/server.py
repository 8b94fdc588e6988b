"""An OpenAI-compatible speech server over the continuous-batching engine (FastAPI + uvicorn).

  POST /v1/audio/speech  {"model": "csm-1b", "input": "...", "voice": "alice", "response_format": "wav",
                          "speed": 1.0, "stream": true, "seed": 0}       -> audio (streamed as it is generated)
  GET  /v1/models, GET /health
  GET  /converse, WebSocket /v1/converse     (when a conversation factory is given: talk to it, see below)

One thread drives the device: it inserts queued requests into free engine slots and steps the engine;
request handlers only talk to it through queues. The queue of waiting requests is bounded: when it is full,
the answer is 429 with Retry-After, never a hang. A client that disconnects frees its slot at once.

Voices: `voices_dir/NAME.wav` (any format soundfile reads) with `NAME.txt` (its transcript) and optionally
`NAME.json` (`{"speaker": 1}`; speaker 0 otherwise), loaded and Mimi-encoded once at start-up and given to CSM
as context, so `voice="NAME"` speaks in that voice. `voice="default"` (or none) uses no voice prompt.
Extensions of OpenAI's body: `seed` (the same seed gives the same audio), `temperature` (0 = greedy) and
`topk` for sampling, and `max_audio_ms` (a cap on the audio).

Conversations (csm_jax.converse): GET /converse is a page that streams the microphone over the WebSocket
/v1/converse and plays the reply as it streams back. Protocol: the client sends {"type": "start",
"sample_rate": SR} first, then binary messages of float32 mono samples at SR, and {"type": "end_turn"} to end
a turn at once (push to talk; otherwise voice activity ends it). The server sends JSON events
{"type": "ready" | "speech_start" | "user" | "reply" | "barge_in" | "no_words" | "turn" | "error", ...} and
the reply audio as binary 16-bit PCM, 24 kHz mono. Each connection holds one conversation (its own CSM
context); at most `max_conversations` at once, more are refused with close code 1013. A client that goes
away stops its reply and frees its conversation.
"""

from __future__ import annotations

import io
import json
import queue
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from csm_jax.engine import Engine, Request
from csm_jax.text import Segment

FORMATS = {"wav": "audio/wav", "pcm": "audio/L16; rate=24000; channels=1", "flac": "audio/flac"}
MAX_INPUT_CHARS = 4096


def load_voices(folder: str | Path | None, gen) -> dict[str, list[Segment]]:
    voices: dict[str, list[Segment]] = {}
    if folder is None:
        return voices
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"voices folder not found: {folder}")
    from csm_jax.audio import load_audio

    for txt in sorted(folder.glob("*.txt")):
        name = txt.stem
        audio_files = [p for p in folder.glob(f"{name}.*") if p.suffix.lower() not in (".txt", ".json")]
        if not audio_files:
            raise FileNotFoundError(f"voice '{name}': {txt} has no audio file beside it ({name}.wav)")
        meta = json.loads((folder / f"{name}.json").read_text()) if (folder / f"{name}.json").exists() else {}
        seg = Segment(int(meta.get("speaker", 0)), txt.read_text().strip(), audio=load_audio(audio_files[0]))
        voices[name] = gen.context_codes([seg])
    return voices


@dataclass
class Job:
    request: Request
    out: queue.Queue = field(default_factory=queue.Queue)  # audio chunks, then None (done) or an Exception
    cancelled: threading.Event = field(default_factory=threading.Event)
    slot: int | None = None


class Worker(threading.Thread):
    """Owns the engine: admits jobs into free slots, steps, routes audio back. The only thread using the device."""

    def __init__(self, engine: Engine, max_queue: int):
        super().__init__(daemon=True, name="csm-engine")
        self.engine = engine
        self.pending: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.jobs: dict[int, Job] = {}
        self.stopping = threading.Event()

    def submit(self, job: Job) -> bool:
        try:
            self.pending.put_nowait(job)
            return True
        except queue.Full:
            return False

    def stats(self) -> dict:
        return {"slots": self.engine.slots, "busy_slots": len(self.jobs), "queued": self.pending.qsize()}

    def run(self) -> None:
        while not self.stopping.is_set():
            for slot, job in list(self.jobs.items()):
                if job.cancelled.is_set():
                    self.engine.cancel(slot)
                    del self.jobs[slot]
            while self.engine.free_slots():
                try:
                    job = self.pending.get(timeout=0.05 if not self.jobs else 0)
                except queue.Empty:
                    break
                if job.cancelled.is_set():
                    continue
                try:
                    slot = self.engine.submit(job.request)
                except Exception as e:  # noqa: BLE001 - a bad request fails alone, the others go on
                    job.out.put(e)
                    continue
                job.slot = slot
                self.jobs[slot] = job
            if not self.jobs:
                continue
            for slot, ev in self.engine.step().items():
                job = self.jobs.get(slot)
                if job is None:
                    continue
                if ev.audio.size:
                    job.out.put(ev.audio)
                if ev.finished:
                    job.out.put(None)
                    del self.jobs[slot]
        for job in list(self.jobs.values()):
            job.out.put(RuntimeError("server shutting down"))


def _wav_header(n_bytes: int = 0xFFFFFFFF - 36) -> bytes:
    """A 16-bit mono 24 kHz WAV header; the streaming form declares the largest size (players read to EOF)."""
    return (b"RIFF" + struct.pack("<I", min(n_bytes + 36, 0xFFFFFFFF)) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16) + b"data" + struct.pack("<I", n_bytes))


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def create_app(engine: Engine, voices: dict[str, list[Segment]], max_queue: int = 16, model_name: str = "csm-1b",
               conversations=None, max_conversations: int = 2):
    """`conversations`: optional `() -> (Conversation, TurnDetector factory taking a sample rate)`, which
    enables the /converse page and the /v1/converse WebSocket."""
    from contextlib import asynccontextmanager

    worker = Worker(engine, max_queue)
    live: dict = {}  # the conversations open now: a token each -> its LiveSession (None while it starts)
    counters = {"closed_mid_reply": 0}  # conversations whose client went away while a reply was being made

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        for session in list(live.values()):
            if session is not None:
                session.close(timeout=0)
        worker.stopping.set()
        worker.join(timeout=30)

    app = FastAPI(title="csm-jax speech server", lifespan=lifespan)

    def error(status, message, **headers):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status, headers=headers)

    @app.get("/health")
    def health():
        return {"status": "ok", **worker.stats(), "conversations": len(live),
                "conversations_closed_mid_reply": counters["closed_mid_reply"]}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "csm-jax"}]}

    @app.post("/v1/audio/speech")
    async def speech(http: HTTPRequest):
        try:
            body = await http.json()
        except ValueError:
            return error(400, "the body must be JSON")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            return error(400, "'input' is empty: give the text to speak")
        if len(text) > MAX_INPUT_CHARS:
            return error(400, f"'input' has {len(text)} characters; the limit is {MAX_INPUT_CHARS}")
        fmt = body.get("response_format", "wav")
        if fmt not in FORMATS:
            return error(400, f"unsupported response_format '{fmt}'; supported: {', '.join(FORMATS)}")
        speed = body.get("speed", 1.0)
        if not isinstance(speed, (int, float)) or speed != 1.0:
            return error(400, f"speed {speed!r} is not supported: CSM speaks at its own pace; use 1.0")
        voice = body.get("voice") or "default"
        if voice != "default" and voice not in voices:
            return error(400, f"unknown voice '{voice}'; available: {', '.join(['default', *sorted(voices)])}")
        seed = body.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            return error(400, "'seed' must be an integer")
        max_audio_ms = body.get("max_audio_ms", 10_000)
        if not isinstance(max_audio_ms, int) or isinstance(max_audio_ms, bool) or max_audio_ms < 80:
            return error(400, f"'max_audio_ms' must be an integer of at least 80 (one frame), got {max_audio_ms!r}")
        temperature = body.get("temperature", 0.9)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 5:
            return error(400, f"'temperature' must be a number from 0 (greedy) to 5, got {temperature!r}")
        topk = body.get("topk", 50)
        if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= 2048:
            return error(400, f"'topk' must be an integer from 1 to 2048, got {topk!r}")
        context = voices.get(voice, [])
        speaker = context[0].speaker if context else 0
        job = Job(Request(text.strip(), speaker=speaker, context=list(context), seed=seed,
                          temperature=float(temperature), topk=topk, max_audio_ms=max_audio_ms))
        if not worker.submit(job):
            return error(429, "the server is busy: too many requests waiting; retry shortly", **{"Retry-After": "1"})

        async def chunks():
            import asyncio

            try:
                while True:
                    try:
                        item = await asyncio.to_thread(job.out.get, True, 0.5)
                    except queue.Empty:
                        continue
                    if item is None:
                        return
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                job.cancelled.set()  # a client gone mid-stream frees its slot at the worker's next turn

        if fmt == "flac" or not body.get("stream", True):
            parts = []
            try:
                async for c in chunks():
                    parts.append(c)
            except ValueError as e:
                return error(400, str(e))
            audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            if fmt == "flac":
                import soundfile as sf

                buf = io.BytesIO()
                sf.write(buf, np.clip(audio, -1, 1), 24000, format="FLAC", subtype="PCM_16")
                return Response(buf.getvalue(), media_type=FORMATS[fmt])
            data = _pcm16(audio)
            return Response((_wav_header(len(data)) if fmt == "wav" else b"") + data, media_type=FORMATS[fmt])

        # Streaming: wait for the first chunk so a bad request still gets a 4xx rather than a broken stream.
        stream = chunks()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            first = np.zeros(0, np.float32)
        except ValueError as e:
            return error(400, str(e))

        async def body_bytes():
            try:
                if fmt == "wav":
                    yield _wav_header()
                yield _pcm16(first)
                async for c in stream:
                    yield _pcm16(c)
            finally:
                job.cancelled.set()
                await stream.aclose()

        return StreamingResponse(body_bytes(), media_type=FORMATS[fmt])

    if conversations is not None:
        _add_conversation_routes(app, conversations, live, max_conversations, counters)
    app.state.worker = worker
    return app


def _add_conversation_routes(app, factory, live: dict, max_conversations: int, counters: dict) -> None:
    import asyncio
    from importlib.resources import files

    from fastapi.responses import HTMLResponse

    from csm_jax.converse import LiveSession, TurnLog

    page = (files("csm_jax") / "web" / "converse.html").read_text(encoding="utf-8")

    @app.get("/converse")
    def converse_page():
        return HTMLResponse(page)

    @app.websocket("/v1/converse")
    async def converse(ws: WebSocket):
        await ws.accept()
        if len(live) >= max_conversations:
            await ws.close(1013, f"all {max_conversations} conversations are in use; try again later")
            return
        session = None
        token = object()
        live[token] = None
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(kind, value):
            try:
                loop.call_soon_threadsafe(out.put_nowait, (kind, value))
            except RuntimeError:  # the connection's loop is gone: nobody is listening any more
                pass

        async def sender():
            while True:
                kind, value = await out.get()
                if kind == "audio":
                    await ws.send_bytes(_pcm16(value))
                elif kind == "turn":
                    await ws.send_json({"type": "turn", "log": json.loads(TurnLog.to_json(value))})
                elif kind == "close":
                    return
                else:
                    await ws.send_json({"type": kind, **({} if value is None else
                                                         {"message" if kind == "error" else "text": value})})

        send_task = asyncio.create_task(sender())
        try:
            try:
                start = await ws.receive_json()
            except (ValueError, KeyError):  # not JSON, or a binary message
                start = None
            sr = start.get("sample_rate") if isinstance(start, dict) and start.get("type") == "start" else None
            if not isinstance(sr, int) or not 8000 <= sr <= 192_000:
                await ws.send_json({"type": "error", "message": "send {\"type\": \"start\", \"sample_rate\": "
                                                             "<8000..192000>} first"})
                return
            try:
                conv, detector = await asyncio.to_thread(factory, sr)
            except Exception as e:  # noqa: BLE001 - told to the client, the server goes on
                await ws.send_json({"type": "error", "message": f"cannot start a conversation: {e}"})
                return
            session = live[token] = LiveSession(conv, detector, emit)
            await ws.send_json({"type": "ready"})
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    break
                if msg.get("bytes") is not None:
                    data = msg["bytes"]
                    if len(data) % 4:
                        emit("error", "audio messages must be float32 samples (a multiple of 4 bytes)")
                        continue
                    samples = np.frombuffer(data, "<f4")
                    if not np.isfinite(samples).all():
                        emit("error", "audio contained NaN or infinite samples; they were dropped")
                        continue
                    await asyncio.to_thread(session.feed, samples)
                elif msg.get("text") is not None:
                    try:
                        cmd = json.loads(msg["text"])
                    except ValueError:
                        cmd = None
                    if isinstance(cmd, dict) and cmd.get("type") == "end_turn":
                        await asyncio.to_thread(session.end_turn)
                    else:
                        emit("error", f"unknown message {msg['text'][:80]!r}; expected {{\"type\": \"end_turn\"}}")
        except WebSocketDisconnect:
            pass
        finally:
            if session is not None:
                if session.replying.is_set():
                    counters["closed_mid_reply"] += 1
                await asyncio.to_thread(session.close)  # stops the reply at its next frames and ends the worker
            live.pop(token, None)
            emit("close", None)
            try:
                await asyncio.wait_for(send_task, 5)
            except Exception:  # noqa: BLE001 - the client is gone
                send_task.cancel()


def serve(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)


__all__ = ["create_app", "load_voices", "serve"]
