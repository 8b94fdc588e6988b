"""Request ids and the access log. Every response carries `X-Request-Id`: the client's when it sent a sane one
(visible ASCII, no spaces, at most 128 characters), else a new one. Every request, HTTP or WebSocket, ends in
one access-log line (logger "csm_jax.access") when it ends, for a stream when its last byte is sent or its
client leaves: its id, method, route, status (499 when the client left before the response was complete),
and for speech the text's length in characters, audio seconds, seconds to the first audio, total seconds and
seconds waiting for a slot; `error` when the audio ended unfinished. Never a key, never the text.

    INFO:     csm_jax.access: request request_id=3f2a... method=POST route=/v1/audio/speech status=200 ...
    {"time": ..., "logger": "csm_jax.access", "message": "request", "request_id": "3f2a...", ...}  (json)

Handlers add what they know to the request's `Record` (`request.state.record`); whoever else wants each
ended request (the metrics) is one of `on_end`. An unexpected error before the response began is logged with
the request's id and answered 500 in the error shape.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from starlette.requests import ClientDisconnect

from csm_jax.audio import SAMPLE_RATE
from csm_jax.server.errors import error

MAX_ID_CHARS = 128
log = logging.getLogger("csm_jax.access")
errors = logging.getLogger("csm_jax.server")


def new_id() -> str:
    return uuid.uuid4().hex


def request_id(scope) -> str:
    """The client's X-Request-Id when it is sane, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            sane = 0 < len(value) <= MAX_ID_CHARS and all(0x21 <= c <= 0x7E for c in value)
            return value.decode("ascii") if sane else new_id()
    return new_id()


@dataclass(eq=False)
class Record:
    """One request as the access log and the metrics see it; its handler adds the speech fields."""

    id: str
    method: str
    route: str
    websocket: bool = False
    started: float = field(default_factory=time.monotonic)
    status: int | None = None
    text_chars: int | None = None
    audio_s: float | None = None  # audio handed to the request, seconds
    first_audio_s: float | None = None  # from the request's arrival
    slot_wait_s: float | None = None  # from its submission to its slot
    total_s: float | None = None
    error: str | None = None  # the error code when the audio ended unfinished
    admitted: bool = False  # a speech request that got a place (Driver.submit took it)
    complete: bool = False  # the response's last byte was sent

    def audio(self, samples: int) -> None:
        """`samples` more samples of audio went to the client (the first: the time to first audio)."""
        if samples and self.first_audio_s is None:
            self.first_audio_s = time.monotonic() - self.started
        self.audio_s = (self.audio_s or 0.0) + samples / SAMPLE_RATE

    def fields(self) -> dict:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {"request_id": self.id, "method": self.method, "route": self.route, "status": self.status,
                "text_chars": self.text_chars, "audio_s": r(self.audio_s), "first_audio_s": r(self.first_audio_s),
                "total_s": r(self.total_s), "slot_wait_s": r(self.slot_wait_s), "error": self.error}


def write(record: Record) -> None:
    """The record's access-log line (csm_jax.server.logs formats its fields)."""
    log.info("request", extra={"fields": record.fields()})


class AccessLog:
    """Gives each request its id and Record, puts the id on the response, and at the request's end writes
    its access-log line and calls each of `on_end(record)`. `in_flight`: the requests not ended yet."""

    def __init__(self, app, on_end: list[Callable[[Record], None]], in_flight: set[Record]):
        self.app, self.on_end, self.in_flight = app, on_end, in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        websocket = scope["type"] == "websocket"
        record = Record(request_id(scope), "GET" if websocket else scope["method"], scope["path"][:200], websocket)
        scope.setdefault("state", {})["record"] = record
        id_header = (b"x-request-id", record.id.encode("ascii"))

        async def send_with_id(message):
            kind = message["type"]
            if kind in ("http.response.start", "websocket.http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
                record.status = message.get("status", 101)
            elif kind == "websocket.close" and record.status is None:
                record.status = 403  # closed before the upgrade
            await send(message)
            if kind.endswith("http.response.body") and not message.get("more_body", False):
                record.complete = True

        self.in_flight.add(record)
        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            record.status = record.status if record.complete else 499  # left while its body arrived
        except Exception as e:
            if record.status is not None or websocket:
                record.error = record.error or "internal_error"
                raise  # the response began: the connection is cut, the client sees the failure
            errors.error("unexpected error (request %s)", record.id, exc_info=e)
            await error(500, f"internal error ({type(e).__name__}); this is a bug in the server")(
                scope, receive, send_with_id)
        finally:
            self.in_flight.discard(record)
            record.total_s = time.monotonic() - record.started
            if not websocket and record.status is not None and not record.complete and record.error is None:
                record.status = 499  # the client left before the response was complete
            write(record)
            for f in self.on_end:
                f(record)
