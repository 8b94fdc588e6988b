"""uvicorn as the server runs it: bounded headers (a header timeout, a size limit, malformed HTTP answered in
the JSON error shape, with a request id and an access line), idle keep-alive connections closed, a drain on
SIGTERM (csm_jax.server.drain), and a process that ends with the cause when the app's start-up fails."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from csm_jax.server.access import Record, new_id, write
from csm_jax.server.errors import MAX_HEADER_BYTES, error

log = logging.getLogger("csm_jax.server")


def header_timeout_protocol(header_timeout: float):
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
            record = Record(new_id(), "-", "-", status=400, complete=True)  # before any app: its own id and line
            head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"), (b"x-request-id", record.id.encode())]
            record.total_s = 0.0
            write(record)
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
    are in; all of them within `header_timeout` s), idle keep-alive connections closed after `keep_alive` s,
    and a drain on SIGTERM or SIGINT (`app.state.drain`, csm_jax.server.drain: the listener stays open, the
    process exits with 0 once it is done; a second signal exits at once) in place of uvicorn's own shutdown,
    which closes the listener at once. A shutdown otherwise first ends what the app cannot finish
    (`app.state.begin_shutdown`) and waits `shutdown_grace` + 5 s for the rest. When the app cannot go on (it
    sets `app.state.fatal` to why, e.g. a failed warm-up, and calls `app.state.stop_serving`), uvicorn stops
    and this raises RuntimeError with the cause, so the process ends non-zero."""
    import uvicorn

    class Server(uvicorn.Server):
        drain_task = None

        def handle_exit(self, sig, frame):  # SIGTERM, SIGINT: the first drains, a second exits at once
            drain = getattr(app.state, "drain", None)
            if drain is not None and drain.begin():
                return  # on_tick starts it; the process then exits with 0
            if drain is not None:  # the second: the shell's status for the signal (130: Ctrl-C, 143: SIGTERM)
                log.warning("a second signal (%s): exiting at once; what is in flight is cut", signal.strsignal(sig))
                os._exit(128 + sig)
            super().handle_exit(sig, frame)

        async def on_tick(self, counter):
            drain = getattr(app.state, "drain", None)
            if drain is not None and drain.draining and self.drain_task is None:
                self.drain_task = asyncio.create_task(drain.run(stop=lambda: setattr(self, "should_exit", True)))
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None):
            begin = getattr(app.state, "begin_shutdown", None)
            if begin is not None:
                begin()
            await super().shutdown(sockets)

    # uvicorn logs through the root logger (csm_jax.server.logs); its access lines give way to AccessLog's.
    config = uvicorn.Config(app, host=host, port=port, log_level="info", log_config=None, access_log=False,
                            http=header_timeout_protocol(header_timeout),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, timeout_keep_alive=keep_alive,
                            timeout_graceful_shutdown=shutdown_grace + 5)
    server = Server(config)
    app.state.stop_serving = lambda: setattr(server, "should_exit", True)
    server.run()
    fatal = getattr(app.state, "fatal", None)
    if fatal is not None:
        raise RuntimeError(f"the server stopped: {fatal}")
