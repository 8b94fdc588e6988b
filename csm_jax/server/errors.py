"""Errors as the server answers them: OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}},
for every refusal, the app's own and the HTTP layer's (malformed requests, oversized headers)."""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse, Response

MAX_HEADER_BYTES = 16 * 1024
ERROR_TYPES = {**dict.fromkeys((400, 401, 404, 405, 408, 413, 431), "invalid_request_error"), 429: "rate_limit_error"}


class ASCIIJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped, so a lone surrogate echoed back in a message cannot fail to encode."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(status: int, message: str, param: str | None = None, code: str | None = None, **headers) -> Response:
    """An error in OpenAI's shape (5xx: "server_error")."""
    kind = ERROR_TYPES.get(status, "server_error")
    return ASCIIJSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                             status, headers=headers)


async def refuse(scope, receive, send, response: Response, close_code: int) -> None:
    """`response` to an HTTP request, or to a WebSocket's handshake instead of the upgrade (ASGI's denial
    response; a server without it gets a close before the upgrade, i.e. HTTP 403, with `close_code`)."""
    if scope["type"] == "http" or "websocket.http.response" in scope.get("extensions", {}):
        return await response(scope, receive, send)
    await send({"type": "websocket.close", "code": close_code, "reason": ""})


class BadRequest(Exception):
    """A request body the server refuses (400); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class BodyTooLarge(Exception):
    pass


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
