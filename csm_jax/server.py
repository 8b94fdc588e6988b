"""An OpenAI-compatible speech server over the continuous-batching engine (FastAPI + uvicorn).

  POST /v1/audio/speech  {"model": "csm-1b", "input": "...", "voice": "alice", "response_format": "wav",
                          "speed": 1.0, "stream": true, "seed": 0}       -> audio (streamed as it is generated)
  GET  /v1/models, GET /health
  GET  /converse, WebSocket /v1/converse     (when a conversation factory is given: talk to it, see below)

One thread drives the device: it inserts queued requests into free engine slots and steps the engine;
request handlers only talk to it through queues. At most `slots + max_queue` requests are admitted at once
(in a slot, being prefilled, or waiting); beyond that the answer is 429 with Retry-After, never a hang. A client
that disconnects, streamed or not, frees its queue place at once and its slot after the step under way.

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad body (with
the field in `param`; also malformed HTTP), 404/405 for a wrong route, 408 for a body that arrives too
slowly, 413 for a body over `max_body_bytes` (refused before it is read whole), 431 for headers over 16 KB,
429 when full, 503 when the engine failed or the server is shutting down. A failed engine step ends every
request in flight or waiting with an error the client sees (503, or a stream cut short), /health answers 503
with the failure, and the worker resets the engine and checks it with one short utterance before it admits
requests again. On shutdown (SIGTERM) new and waiting requests get 503 at once, requests in a slot get
`shutdown_grace` seconds to finish; after that non-streamed ones get 503 and streams end.

Voices: `voices_dir/NAME.wav` (any format soundfile reads) with `NAME.txt` (its transcript) and optionally
`NAME.json` (`{"speaker": 1}`; speaker 0 otherwise), loaded and Mimi-encoded once at start-up and given to CSM
as context, so `voice="NAME"` speaks in that voice. `voice="default"` (or none) uses no voice prompt.
Extensions of OpenAI's body: `seed` (0 .. 2**32-1, the uint32 that seeds the sampler: the same seed gives the
same audio), `temperature` (0 = greedy) and `topk` for sampling, and `max_audio_ms` (a cap on the audio).

Conversations (csm_jax.converse): GET /converse is a page that streams the microphone over the WebSocket
/v1/converse and plays the reply as it streams back. Protocol: the client sends {"type": "start",
"sample_rate": SR} first, then binary messages of float32 mono samples at SR, and {"type": "end_turn"} to end
a turn at once (push to talk; otherwise voice activity ends it). The server sends JSON events
{"type": "ready" | "speech_start" | "user" | "reply" | "barge_in" | "no_words" | "turn" | "error", ...} and
the reply audio as binary 16-bit PCM, 24 kHz mono. Each connection holds one conversation (its own CSM
context); at most `max_conversations` at once, more are refused with close code 1013. A client that goes
away stops its reply and frees its conversation. Close codes: 1003 when the first message is not a valid
start (after an error event), 1008 when no start arrives within `ws_start_timeout` seconds or nothing arrives
for `ws_idle_timeout` seconds while no reply is under way, 1011 when a conversation cannot be made.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import reprlib
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from csm_jax.engine import FRAME_MS, Engine, Request
from csm_jax.text import Segment

FORMATS = {"wav": "audio/wav", "pcm": "audio/L16; rate=24000; channels=1", "flac": "audio/flac"}
MAX_INPUT_CHARS = 4096
MAX_SEED = 2**32 - 1  # seeds are the uint32 that seeds each request's PRNG stream
log = logging.getLogger("csm_jax.server")


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


class EngineFailed(Exception):
    """The engine failed while the request was in flight or waiting; retrying later may work."""


class ShuttingDown(Exception):
    """The server is stopping and will not finish the request."""


@dataclass(eq=False)
class Job:
    """One request's way through the worker. The worker puts audio chunks on `out`, then None (done) or an
    Exception (ValueError: the request was bad; EngineFailed; ShuttingDown)."""

    request: Request
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    slot: int | None = None

    def put(self, item) -> None:  # from the worker thread
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Worker(threading.Thread):
    """Owns the engine: admits jobs into free slots, steps, routes audio back. The only thread using the device.

    `admitted` counts every job in a slot, being prefilled or waiting, so capacity is exactly
    slots + max_queue. A failed step fails every job, resets the engine and checks it with a one-frame probe
    (retried with backoff) before new jobs are admitted again."""

    PROBE = Request("Hello.", max_audio_ms=FRAME_MS)

    def __init__(self, engine: Engine, max_queue: int, warmup: bool = True):
        super().__init__(daemon=True, name="csm-engine")
        self.engine = engine
        self.capacity = engine.slots + max_queue
        self.lock = threading.Condition()
        self.pending: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}
        self.admitted = 0
        self.failure: str | None = None  # set from a failed step until the engine is checked again
        self.failures = 0
        self.stopping = False
        self.deadline = float("inf")  # when stopping: jobs still in a slot at this time are ended
        self.warmup = warmup
        self.warming = warmup  # until every program the engine can run is compiled (/health: "warming")
        self.more = False  # the engine has work of its own (conversations' held slots): keep stepping
        engine.on_work = self.wake

    # --- called from the server's event loop ---
    def submit(self, job: Job) -> bool:
        """Queues `job`; False when the server is full. Raises EngineFailed / ShuttingDown when not serving."""
        with self.lock:
            if self.stopping:
                raise ShuttingDown("the server is shutting down")
            if self.failure is not None:
                raise EngineFailed(self.failure)
            if self.admitted >= self.capacity:
                return False
            self.admitted += 1
            self.pending.append(job)
            self.lock.notify()
            return True

    def cancel(self, job: Job) -> None:
        """The client went away: a waiting job leaves the queue now, a job in a slot after the current step."""
        with self.lock:
            if job.cancelled:
                return
            job.cancelled = True
            try:
                self.pending.remove(job)
                self.admitted -= 1
            except ValueError:
                pass
            self.lock.notify()

    def begin_shutdown(self, grace: float) -> None:
        """New jobs are refused and waiting ones failed now; jobs in a slot get `grace` seconds."""
        with self.lock:
            if not self.stopping:
                self.stopping, self.deadline = True, time.monotonic() + grace
            waiting, self.pending = list(self.pending), deque()
            self.admitted -= len(waiting)
            self.lock.notify()
        for job in waiting:
            job.put(ShuttingDown("the server is shutting down; the request was not started"))

    def stats(self) -> dict:
        with self.lock:
            return {"slots": self.engine.slots, "busy_slots": len(self.jobs), "queued": len(self.pending),
                    "capacity": self.capacity, "engine_failures": self.failures,
                    "deferred_admissions": self.engine.schedule.deferrals}

    # --- the worker thread ---
    def wake(self) -> None:
        """The engine got work from another thread (a conversation started a reply): step it."""
        with self.lock:
            self.more = True
            self.lock.notify()

    def run(self) -> None:
        self.engine.driven.set()  # conversations wait for this thread's steps instead of stepping themselves
        if self.warmup:
            t0 = time.monotonic()
            n = self.engine.warmup(lambda msg: log.info("warm-up: %s", msg))
            log.info("warm-up: %d programs compiled in %.1f s; serving", n, time.monotonic() - t0)
        with self.lock:
            self.warming = False
        while True:
            with self.lock:
                while not (self.pending or self.jobs or self.stopping or self.more):
                    self.lock.wait()
                self.more = False
                if self.stopping and (not self.jobs or time.monotonic() >= self.deadline):
                    break
                gone = [slot for slot, job in self.jobs.items() if job.cancelled]
            try:
                for slot in gone:
                    self.engine.cancel(slot)
                    self._finish(slot)
                self._admit()
                if self.jobs or self.engine.busy():
                    self._step()
                if self.engine.busy():
                    with self.lock:
                        self.more = True
            except Exception as e:  # noqa: BLE001 - a failed device call must not kill the server
                self._recover(e)
        self.engine.driven.clear()
        for slot, job in list(self.jobs.items()):
            job.put(ShuttingDown("the server is shutting down: the audio was not finished in time"))
            self.engine.cancel(slot)
            self._finish(slot)

    def _finish(self, slot: int) -> None:
        with self.lock:
            del self.jobs[slot]
            self.admitted -= 1

    def _admit(self) -> None:
        while self.engine.free_slots():
            with self.lock:
                if not self.pending or self.stopping:
                    return
                job = self.pending.popleft()  # still counted in `admitted` while it is prefilled
            try:
                slot = self.engine.submit(job.request)
            except ValueError as e:  # a bad request fails alone, the others go on
                job.put(e)
                with self.lock:
                    self.admitted -= 1
                continue
            except Exception:
                with self.lock:
                    self.admitted -= 1
                job.put(EngineFailed("the engine failed to prefill this request"))
                raise
            job.slot = slot
            with self.lock:
                self.jobs[slot] = job  # a client that left during the prefill is dropped at the next turn

    def _step(self) -> None:
        for slot, ev in self.engine.step().items():
            job = self.jobs.get(slot)
            if job is None:
                continue
            if ev.audio.size:
                job.put(ev.audio)
            if getattr(ev, "error", None):  # an engine that reports a failure per slot instead of raising
                job.put(EngineFailed(f"the speech engine failed: {ev.error}; retry shortly"))
                self._finish(slot)
            elif ev.finished:
                job.put(None)
                self._finish(slot)

    def _recover(self, error: Exception) -> None:
        log.error("engine step failed; ending every request and resetting the engine", exc_info=error)
        message = (f"the speech engine failed ({type(error).__name__}: {str(error)[:200]}); the request was "
                   f"dropped and the engine is being reset: retry shortly")
        with self.lock:
            self.failure, self.failures = message, self.failures + 1
            victims = list(self.jobs.values()) + list(self.pending)
            self.jobs, self.pending = {}, deque()
            self.admitted -= len(victims)
        for job in victims:
            job.put(EngineFailed(message))
        backoff = 0.5
        while True:
            try:
                self.engine.fail(message)  # fresh state; held conversations are told too
                self.engine.submit(self.PROBE)
                while self.engine.busy():  # one frame: dispatched, run and read back
                    self.engine.step()
                break
            except Exception as e:  # noqa: BLE001 - still broken: keep answering 503 and try again later
                log.error("engine check after a failure failed; retrying in %.1f s", backoff, exc_info=e)
                with self.lock:
                    self.failure, self.failures = f"{message} (the check after the reset failed: {e!s:.200})", \
                        self.failures + 1
                    if self.stopping or self.lock.wait_for(lambda: self.stopping, backoff):
                        return
                backoff = min(2 * backoff, 30.0)
        with self.lock:
            self.failure = None
        log.info("engine reset and checked; serving again")


def _wav_header(n_bytes: int = 0xFFFFFFFF - 36) -> bytes:
    """A 16-bit mono 24 kHz WAV header; the streaming form declares the largest size (players read to EOF)."""
    return (b"RIFF" + struct.pack("<I", min(n_bytes + 36, 0xFFFFFFFF)) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16) + b"data" + struct.pack("<I", n_bytes))


def _pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


class ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so a lone surrogate echoed back in a message cannot fail to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
               408: "invalid_request_error", 413: "invalid_request_error", 431: "invalid_request_error",
               429: "rate_limit_error"}
MAX_HEADER_BYTES = 16 * 1024


def error(status: int, message: str, param: str | None = None, code: str | None = None, **headers) -> Response:
    """An error in OpenAI's shape."""
    kind = ERROR_TYPES.get(status, "server_error")
    return ASCIIJSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BodyTooLarge(Exception):
    pass


_show = reprlib.Repr()
_show.maxstring = _show.maxother = 60


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_speech(body, voices: dict, max_frames: int) -> tuple[Request, str, bool]:
    """The speech request's body -> (engine request, response format, stream); BadRequest names the field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, got {_show.repr(model)}", "model")
    text = body.get("input")
    if text is None:
        raise BadRequest("'input' is missing: give the text to speak", "input")
    if not isinstance(text, str):
        raise BadRequest(f"'input' must be a string (the text to speak), got {type(text).__name__} "
                         f"{_show.repr(text)}", "input")
    if not text.strip():
        raise BadRequest("'input' is empty: give the text to speak", "input")
    if len(text) > MAX_INPUT_CHARS:
        raise BadRequest(f"'input' has {len(text)} characters; the limit is {MAX_INPUT_CHARS}", "input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"'input' is not valid Unicode: a lone surrogate at character {e.start}; send UTF-8 text",
                         "input") from None
    fmt = body.get("response_format", "wav")
    if not isinstance(fmt, str) or fmt not in FORMATS:
        raise BadRequest(f"unsupported response_format {_show.repr(fmt)}; supported: {', '.join(FORMATS)}",
                         "response_format")
    speed = body.get("speed", 1.0)
    if not _is_number(speed) or speed != 1.0:
        raise BadRequest(f"speed {_show.repr(speed)} is not supported: CSM speaks at its own pace; use 1.0", "speed")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be true or false, got {_show.repr(stream)}", "stream")
    voice = body.get("voice")
    voice = "default" if voice is None or voice == "" else voice
    if not isinstance(voice, str):
        raise BadRequest(f"'voice' must be a string (a voice name), got {_show.repr(voice)}", "voice")
    if voice != "default" and voice not in voices:
        raise BadRequest(f"unknown voice {_show.repr(voice)}; available: {', '.join(['default', *sorted(voices)])}",
                         "voice")
    seed = body.get("seed", 0)
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise BadRequest(f"'seed' must be an integer from 0 to {MAX_SEED} (2**32-1), got {_show.repr(seed)}", "seed")
    max_audio_ms = body.get("max_audio_ms", 10_000)
    if not _is_int(max_audio_ms) or not FRAME_MS <= max_audio_ms <= max_frames * FRAME_MS:
        raise BadRequest(f"'max_audio_ms' must be an integer from {FRAME_MS} (one frame) to "
                         f"{max_frames * FRAME_MS}, got {_show.repr(max_audio_ms)}", "max_audio_ms")
    temperature = body.get("temperature", 0.9)
    if not _is_number(temperature) or not 0 <= temperature <= 5:
        raise BadRequest(f"'temperature' must be a number from 0 (greedy) to 5, got {_show.repr(temperature)}",
                         "temperature")
    topk = body.get("topk", 50)
    if not _is_int(topk) or not 1 <= topk <= 2048:
        raise BadRequest(f"'topk' must be an integer from 1 to 2048, got {_show.repr(topk)}", "topk")
    context = voices.get(voice, [])
    speaker = context[0].speaker if context else 0
    request = Request(text.strip(), speaker=speaker, context=list(context), seed=seed,
                      temperature=float(temperature), topk=topk, max_audio_ms=max_audio_ms)
    return request, fmt, stream


async def _read_body(http: HTTPRequest, limit: int) -> bytes:
    """The body, refused (BodyTooLarge) as soon as it is known to be over `limit` bytes: from Content-Length
    before anything is read, or while a chunked body arrives."""
    length = http.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


class ClientGone(Exception):
    pass


class HeaderLimit:
    """431 for requests whose headers add up to more than MAX_HEADER_BYTES. (h11 refuses more than that only
    while headers are incomplete, i.e. when they trickle in; all at once they reach the app.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > MAX_HEADER_BYTES:
            too_large = error(431, f"the request's headers are over {MAX_HEADER_BYTES} bytes", code="headers_too_large")
            return await too_large(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(engine: Engine, voices: dict[str, list[Segment]], max_queue: int = 16, model_name: str = "csm-1b",
               conversations=None, max_conversations: int = 2, max_body_bytes: int = 64 * 1024,
               request_timeout: float = 10.0, shutdown_grace: float = 8.0, ws_start_timeout: float = 10.0,
               ws_idle_timeout: float = 300.0, warmup: bool = True):
    """`conversations`: optional `() -> (Conversation, TurnDetector factory taking a sample rate)`, which
    enables the /converse page and the /v1/converse WebSocket. The limits are described in the module's
    docstring; `request_timeout` bounds the arrival of a request's body (its headers: see `serve`). With
    `warmup`, the worker compiles every program the engine can run before it serves (/health: "warming")."""
    from contextlib import asynccontextmanager

    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    worker = Worker(engine, max_queue, warmup)
    live: dict = {}  # the conversations open now: a token each -> its LiveSession (None while it starts)
    counters = {"closed_mid_reply": 0}  # conversations whose client went away while a reply was being made
    max_frames = engine.cfg.max_seq_len

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        for session in list(live.values()):
            if session is not None:
                session.close(timeout=0)
        worker.begin_shutdown(0)
        await asyncio.to_thread(worker.join, 30)

    app = FastAPI(title="csm-jax speech server", lifespan=lifespan)
    app.add_middleware(HeaderLimit)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(400, str(exc)[:300])

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        if not isinstance(exc, EngineFailed):  # (a stream cut short by a failed step: logged by the worker)
            log.error("unexpected error", exc_info=exc)
        return error(500, f"internal error ({type(exc).__name__}); this is a bug in the server")

    @app.get("/health")
    def health():
        stats = worker.stats()
        body = {"status": "ok", **stats, "conversations": len(live),
                "conversations_closed_mid_reply": counters["closed_mid_reply"]}
        if worker.stopping:
            return ASCIIJSONResponse({**body, "status": "shutting_down"}, 503)
        if worker.warming:
            return ASCIIJSONResponse({**body, "status": "warming"}, 503)
        failure = worker.failure
        if failure is not None:
            return ASCIIJSONResponse({**body, "status": "error", "error": failure}, 503)
        return body

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "csm-jax"}]}

    def failed(e: Exception) -> Response:
        if isinstance(e, ValueError):  # the engine refused the request (e.g. its prompt is over budget)
            return error(400, str(e), code="invalid_request")
        if isinstance(e, EngineFailed):
            return error(503, str(e), code="engine_failed", **{"Retry-After": "1"})
        if isinstance(e, ShuttingDown):
            return error(503, str(e), code="shutting_down")
        log.error("request failed", exc_info=e)
        return error(500, f"internal error ({type(e).__name__}); this is a bug in the server")

    async def next_item(job: Job, http: HTTPRequest):
        """The job's next chunk (None: done); raises the job's error, or ClientGone when the client left."""
        while True:
            try:
                item = await asyncio.wait_for(job.out.get(), 0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    worker.cancel(job)
                    raise ClientGone from None
                continue
            if isinstance(item, Exception):
                raise item
            return item

    @app.post("/v1/audio/speech")
    async def speech(http: HTTPRequest):
        try:
            raw = await asyncio.wait_for(_read_body(http, max_body_bytes), request_timeout)
        except BodyTooLarge:
            return error(413, f"the body is over {max_body_bytes} bytes; the text to speak is limited to "
                              f"{MAX_INPUT_CHARS} characters", code="body_too_large", Connection="close")
        except asyncio.TimeoutError:
            return error(408, f"the body did not arrive within {request_timeout:g} s", code="timeout",
                         Connection="close")
        try:
            body = json.loads(raw)
        except RecursionError:
            return error(400, "the body is JSON nested too deeply", code="invalid_json")
        except ValueError as e:  # also bad UTF-8 and over-long numbers
            return error(400, f"the body must be a JSON object: {str(e)[:120]}", code="invalid_json")
        try:
            request, fmt, stream = parse_speech(body, voices, max_frames)
        except BadRequest as e:
            return error(400, str(e), e.param, "invalid_value")
        job = Job(request, asyncio.get_running_loop())
        try:
            if not worker.submit(job):
                return error(429, f"the server is busy: all {worker.capacity} places (slots and queue) are taken; "
                                  "retry shortly", code="busy", **{"Retry-After": "1"})
        except (EngineFailed, ShuttingDown) as e:
            return failed(e)

        if fmt == "flac" or not stream:
            parts = []
            try:
                while (item := await next_item(job, http)) is not None:
                    parts.append(item)
            except ClientGone:
                return Response(status_code=499)  # nobody reads it
            except Exception as e:  # noqa: BLE001 - every failure is answered in the error shape
                return failed(e)
            finally:
                worker.cancel(job)  # no-op unless the handler itself was cancelled
            audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            if fmt == "flac":
                import soundfile as sf

                buf = io.BytesIO()
                sf.write(buf, np.clip(audio, -1, 1), 24000, format="FLAC", subtype="PCM_16")
                return Response(buf.getvalue(), media_type=FORMATS[fmt])
            data = _pcm16(audio)
            return Response((_wav_header(len(data)) if fmt == "wav" else b"") + data, media_type=FORMATS[fmt])

        # Streaming: wait for the first chunk so a bad request (or a queued one the server cannot start) still
        # gets an error status rather than a broken stream.
        try:
            first = await next_item(job, http)
        except ClientGone:
            return Response(status_code=499)
        except BaseException as e:
            worker.cancel(job)
            if isinstance(e, Exception):
                return failed(e)
            raise

        async def body_bytes():
            try:
                if fmt == "wav":
                    yield _wav_header()
                if first is None:
                    return
                yield _pcm16(first)
                while (item := await job.out.get()) is not None:
                    if isinstance(item, ShuttingDown):
                        return  # the stream ends cleanly: the server stops
                    if isinstance(item, Exception):
                        raise item  # the stream is cut short (no final chunk): the client sees the failure
                    yield _pcm16(item)
            finally:
                worker.cancel(job)  # a client gone mid-stream frees its slot at the worker's next turn

        return StreamingResponse(body_bytes(), media_type=FORMATS[fmt])

    if conversations is not None:
        _add_conversation_routes(app, conversations, live, max_conversations, counters, ws_start_timeout,
                                 ws_idle_timeout)
    app.state.worker = worker
    app.state.begin_shutdown = lambda: worker.begin_shutdown(shutdown_grace)
    return app


def _add_conversation_routes(app, factory, live: dict, max_conversations: int, counters: dict,
                             start_timeout: float, idle_timeout: float) -> None:
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
        close: tuple[int, str] | None = (1000, "")  # None: the client already went away

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
                msg = await asyncio.wait_for(ws.receive(), start_timeout)
            except asyncio.TimeoutError:
                close = (1008, f"no start message within {start_timeout:g} s")
                return
            if msg["type"] == "websocket.disconnect":
                close = None
                return
            try:
                start = json.loads(msg["text"]) if msg.get("text") is not None else None
            except (ValueError, RecursionError):
                start = None
            sr = start.get("sample_rate") if isinstance(start, dict) and start.get("type") == "start" else None
            if not isinstance(sr, int) or isinstance(sr, bool) or not 8000 <= sr <= 192_000:
                emit("error", "send {\"type\": \"start\", \"sample_rate\": <8000..192000>} first")
                close = (1003, "expected a start message first")
                return
            try:
                conv, detector = await asyncio.to_thread(factory, sr)
            except Exception as e:  # noqa: BLE001 - told to the client, the server goes on
                emit("error", f"cannot start a conversation: {e}")
                close = (1011, "cannot start a conversation")
                return
            session = live[token] = LiveSession(conv, detector, emit)
            emit("ready", None)
            while True:
                try:
                    msg = await asyncio.wait_for(ws.receive(), idle_timeout)
                except asyncio.TimeoutError:
                    if session.replying.is_set():
                        continue  # a listener may stay quiet while the reply plays
                    close = (1008, f"nothing received for {idle_timeout:g} s")
                    return
                if msg["type"] == "websocket.disconnect":
                    close = None
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
                    except (ValueError, RecursionError):
                        cmd = None
                    if isinstance(cmd, dict) and cmd.get("type") == "end_turn":
                        await asyncio.to_thread(session.end_turn)
                    else:
                        emit("error", f"unknown message {msg['text'][:80]!r}; expected {{\"type\": \"end_turn\"}}")
        except WebSocketDisconnect:
            close = None
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
                close = None
            if close is not None:
                try:
                    await ws.close(*close)
                except Exception:  # noqa: BLE001 - the client left meanwhile
                    pass


def _protocol(header_timeout: float):
    """uvicorn's h11 protocol, plus: a connection whose next request's headers have not all arrived within
    `header_timeout` seconds of the connection opening (or of the previous response) is closed. uvicorn's own
    keep-alive timer stops at the first byte, so a client that trickles headers would otherwise hold it."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timeout()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timeout()

        def _arm_header_timeout(self):
            cycle = self.cycle  # a request whose headers arrive makes a new cycle

            def expire():
                if self.cycle is cycle and self.transport.get_protocol() is self and not self.transport.is_closing():
                    self.transport.close()

            self.loop.call_later(header_timeout, expire)

        def send_400_response(self, msg: str) -> None:  # malformed HTTP: the same JSON error shape as the app's
            import h11

            body = error(400, f"{msg} (malformed HTTP; headers are limited to {MAX_HEADER_BYTES} bytes)",
                         code="bad_http").body
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")]
            try:
                for event in (h11.Response(status_code=400, headers=head, reason=b"Bad Request"), h11.Data(data=body),
                              h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            except h11.LocalProtocolError:
                pass
            self.transport.close()

    return Protocol


def serve(app, host: str, port: int, header_timeout: float = 10.0, keep_alive: float = 5.0,
          shutdown_grace: float = 8.0) -> None:
    """uvicorn with bounded headers (16 KB: h11 refuses more while they are incomplete, HeaderLimit once they
    are in; all of them within `header_timeout` s), idle
    keep-alive connections closed after `keep_alive` s, and a shutdown that first ends what the app cannot
    finish (`app.state.begin_shutdown`) and waits `shutdown_grace` + 5 s for the rest."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            begin = getattr(app.state, "begin_shutdown", None)
            if begin is not None:
                begin()
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", http=_protocol(header_timeout),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=keep_alive,
                            timeout_graceful_shutdown=shutdown_grace + 5)
    Server(config).run()


__all__ = ["create_app", "load_voices", "parse_speech", "serve"]
