"""POST /v1/audio/speech: the body checked (`parse_speech`), the request handed to the driver, its audio
streamed back as the driver's thread makes it (wav, pcm) or sent whole (flac, or "stream": false)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import reprlib
import struct
import time
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import Response, StreamingResponse

from csm_jax.audio import FRAME_MS, SAMPLE_RATE
from csm_jax.driver import Driver, EngineFailed, Full, ShuttingDown, Ticket
from csm_jax.request import MAX_SEED, Event, Request, check_seed, frames_for
from csm_jax.server.access import Record
from csm_jax.server.errors import BadRequest, BodyTooLarge, ClientGone, error
from csm_jax.text import Segment

FORMATS = {"wav": "audio/wav", "pcm": "audio/L16; rate=24000; channels=1", "flac": "audio/flac"}
MAX_INPUT_CHARS = 4096
log = logging.getLogger("csm_jax.server")

_show = reprlib.Repr()
_show.maxstring = _show.maxother = 60


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_speech(body, voices: dict[str, list[Segment]], max_frames: int) -> tuple[Request, str, bool]:
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
    try:
        check_seed(seed)
    except ValueError:
        raise BadRequest(f"'seed' must be an integer from 0 to {MAX_SEED} (2**32-1), got {_show.repr(seed)}",
                         "seed") from None
    max_audio_ms = body.get("max_audio_ms", 10_000)
    try:
        if not _is_int(max_audio_ms) or max_audio_ms > max_frames * FRAME_MS:
            raise ValueError
        frames_for(max_audio_ms)
    except ValueError:
        raise BadRequest(f"'max_audio_ms' must be an integer from {FRAME_MS} (one frame) to "
                         f"{max_frames * FRAME_MS}, got {_show.repr(max_audio_ms)}", "max_audio_ms") from None
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


def wav_header(n_bytes: int = 0xFFFFFFFF - 36) -> bytes:
    """A 16-bit mono 24 kHz WAV header; the streaming form declares the largest size (players read to EOF)."""
    return (b"RIFF" + struct.pack("<I", min(n_bytes + 36, 0xFFFFFFFF)) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16) + b"data" +
            struct.pack("<I", n_bytes))


async def read_body(http: HTTPRequest, limit: int) -> bytes:
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


@dataclass(eq=False)
class Job:
    """One request's audio on its way from the driver's thread to its handler: chunks on `out` (16-bit PCM
    bytes, or float32 samples with `floats`), then None (done) or an exception (EngineFailed, ShuttingDown)."""

    loop: asyncio.AbstractEventLoop
    record: Record  # the request's access-log record: what the handler takes goes in it
    floats: bool = False  # float32 samples (for FLAC) rather than the bytes sent as they are
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    ticket: Ticket | None = None
    submitted: float = field(default_factory=time.monotonic)

    def sink(self, ev: Event) -> None:  # from the driver's thread
        if ev.audio.size:  # copies: the event's arrays are views of the whole step's results
            self._put(ev.audio.copy() if self.floats else ev.pcm16.tobytes())
        if ev.error is not None:
            self._put((ShuttingDown if ev.shutdown else EngineFailed)(ev.error))
        elif ev.finished:
            self._put(None)

    def took(self, item):
        """`item`, taken off `out` by the handler, noted in the record; an error is raised (its code noted)."""
        if self.record.slot_wait_s is None and self.ticket is not None and self.ticket.slotted is not None:
            self.record.slot_wait_s = self.ticket.slotted - self.submitted
        if isinstance(item, Exception):
            self.record.error = "shutting_down" if isinstance(item, ShuttingDown) else "engine_failed"
            raise item
        if item is not None:
            self.record.audio(item.size if self.floats else len(item) // 2)
        return item

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def failed(e: Exception) -> Response:
    """A request that could not be (or was not) served, in the error shape."""
    if isinstance(e, ValueError):  # the engine refused the request (e.g. its prompt is over budget)
        return error(400, str(e), code="invalid_request")
    if isinstance(e, EngineFailed):
        return error(503, str(e), code="engine_failed", **{"Retry-After": "1"})
    if isinstance(e, ShuttingDown):
        return error(503, f"the server is {e}", code="shutting_down")
    log.error("request failed", exc_info=e)
    return error(500, f"internal error ({type(e).__name__}); this is a bug in the server")


def add_speech_routes(app: FastAPI, driver: Driver, voices: dict[str, list[Segment]], max_body_bytes: int,
                      request_timeout: float) -> None:
    max_frames = driver.engine.cfg.max_seq_len

    async def next_item(job: Job, http: HTTPRequest):
        """The job's next chunk (None: done); raises the job's error, or ClientGone when the client left."""
        while True:
            try:
                item = await asyncio.wait_for(job.out.get(), 0.25)
            except asyncio.TimeoutError:
                if await http.is_disconnected():
                    driver.cancel(job.ticket)
                    raise ClientGone from None
                continue
            return job.took(item)

    @app.post("/v1/audio/speech")
    async def speech(http: HTTPRequest):
        try:
            raw = await asyncio.wait_for(read_body(http, max_body_bytes), request_timeout)
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
        record: Record = http.state.record
        if isinstance(body, dict) and isinstance(body.get("input"), str):
            record.text_chars = len(body["input"])
        try:
            request, fmt, stream = parse_speech(body, voices, max_frames)
        except BadRequest as e:
            return error(400, str(e), e.param, "invalid_value")
        job = Job(asyncio.get_running_loop(), record, floats=fmt == "flac")
        try:
            job.ticket = driver.submit(request, job.sink)
            record.admitted = True
        except Full:
            return error(429, f"the server is busy: all {driver.capacity} places (slots and queue) are taken; "
                              "retry shortly", code="busy", **{"Retry-After": "1"})
        except (ValueError, EngineFailed, ShuttingDown) as e:
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
                driver.cancel(job.ticket)  # no-op unless the handler itself was cancelled
            if fmt == "flac":
                import soundfile as sf

                audio = np.concatenate(parts) if parts else np.zeros(0, np.float32)
                buf = io.BytesIO()
                sf.write(buf, np.clip(audio, -1, 1), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
                return Response(buf.getvalue(), media_type=FORMATS[fmt])
            data = b"".join(parts)
            return Response((wav_header(len(data)) if fmt == "wav" else b"") + data, media_type=FORMATS[fmt])

        # Streaming: wait for the first chunk so a bad request (or a queued one the server cannot start) still
        # gets an error status rather than a broken stream.
        try:
            first = await next_item(job, http)
        except ClientGone:
            return Response(status_code=499)
        except BaseException as e:
            driver.cancel(job.ticket)
            if isinstance(e, Exception):
                return failed(e)
            raise

        async def body_bytes():
            try:
                if fmt == "wav":
                    yield wav_header()
                if first is None:
                    return
                yield first
                while True:
                    try:
                        item = job.took(await job.out.get())
                    except ShuttingDown:
                        return  # the stream ends cleanly: the server stops
                    # (another error propagates: the stream is cut short, no final chunk; the client sees it)
                    if item is None:
                        return
                    yield item
            finally:
                driver.cancel(job.ticket)  # a client gone mid-stream frees its slot at the driver's next turn

        return StreamingResponse(body_bytes(), media_type=FORMATS[fmt])
