"""The drain, for orchestrators (systemd, Kubernetes, a load balancer): on SIGTERM (or Ctrl-C) the server keeps
listening but takes no new work. New speech requests get 503 with Retry-After (code "draining", and the
connection closes, so a client's retry goes through the balancer to another server), /health answers 503
{"status": "draining"} so the balancer takes the server out, new conversation WebSockets are refused with 503
before the upgrade; everything already in flight (requests in a slot or waiting for one, streams, open
conversations) gets `grace` seconds to finish. Once nothing is left, or the grace is over (what remains then
ends: 503, a stream's clean end, conversations closed), the server stops and the process exits with status 0.
A second signal exits at once (csm_jax.server.protocol).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Callable, Iterable

from csm_jax.server.errors import error, refuse

log = logging.getLogger("csm_jax.server")
OPEN_ROUTES = frozenset({"/health", "/metrics"})  # probes: never kept waiting for, never refused


class Drain:
    """`begin()` (from the signal handler) stops admission; `run(stop)` waits for what is in flight (`in_flight`:
    the AccessLog's records) at most `grace` seconds, then `end()`s what is left and `stop()`s the server."""

    def __init__(self, grace: float, in_flight: set, end: Callable[[], None]):
        self.grace, self.in_flight, self.end = grace, in_flight, end
        self.draining, self.deadline = False, math.inf

    def begin(self) -> bool:
        """Starts the drain; False when it had started already."""
        if self.draining:
            return False
        self.draining, self.deadline = True, time.monotonic() + self.grace
        return True

    def busy(self) -> int:
        """Requests and WebSockets in flight, probes aside."""
        return sum(r.route not in OPEN_ROUTES for r in list(self.in_flight))

    async def run(self, stop: Callable[[], None]) -> None:
        log.info("draining: new requests get 503; %d in flight get up to %g s to finish (a second signal exits "
                 "at once)", self.busy(), self.grace)
        while (left := self.busy()) and time.monotonic() < self.deadline:
            await asyncio.sleep(0.05)
        if left:
            log.warning("drain: the grace of %g s is over; ending the %d requests left", self.grace, left)
        else:
            log.info("drain: nothing left in flight; stopping")
        self.end()
        stop()


class RefuseWhileDraining:
    """503 for new work (`paths`: speech, the conversation WebSocket) while the server drains."""

    def __init__(self, app, drain: Drain, paths: Iterable[str]):
        self.app, self.drain, self.paths = app, drain, frozenset(paths)

    async def __call__(self, scope, receive, send):
        if self.drain.draining and scope["type"] in ("http", "websocket") and scope["path"] in self.paths:
            refusal = error(503, "the server is draining (shutting down) and takes no new requests; retry, and "
                                 "another server will take it", code="draining",
                            **{"Retry-After": "1", "Connection": "close"})
            return await refuse(scope, receive, send, refusal, 1013)
        await self.app(scope, receive, send)
