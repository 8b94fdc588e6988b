"""The app: routes, middleware, error handlers and start-up wired around one running driver."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Callable, Sequence

from fastapi import FastAPI
from fastapi.responses import Response

from csm_jax.driver import Driver
from csm_jax.server.access import AccessLog
from csm_jax.server.conversations import Conversations, add_conversation_routes
from csm_jax.server.drain import Drain, RefuseWhileDraining
from csm_jax.server.errors import ASCIIJSONResponse, HeaderLimit, error
from csm_jax.server.keys import ApiKeys, RequireKey
from csm_jax.server.metrics import Metrics
from csm_jax.server.speech import add_speech_routes
from csm_jax.text import Segment

def create_app(driver: Driver, voices: dict[str, list[Segment]], model_name: str = "csm-1b",
               conversations: Callable | None = None, max_conversations: int = 2, max_body_bytes: int = 64 * 1024,
               request_timeout: float = 10.0, shutdown_grace: float = 8.0, ws_start_timeout: float = 10.0,
               ws_idle_timeout: float = 300.0, warmup: bool = True, api_keys: Sequence[str] = (),
               metrics_auth: bool = True) -> FastAPI:
    """The server over `driver` (not yet running: the app starts its thread, and with `warmup` compiles every
    program first; /health says "warming" meanwhile, with the programs compiled of the total). A warm-up that
    fails (or a driver that stops for good) stops the server: `app.state.fatal` says why, and
    csm_jax.server.serve raises it. `conversations`: optional
    `sample_rate -> (Conversation, TurnDetector)`, which enables the /converse page and the /v1/converse
    WebSocket. The limits are described in csm_jax.server; `request_timeout` bounds the arrival of a request's
    body (its headers: see `serve`). `api_keys`: every route but /health, the /converse page and (unless
    `metrics_auth`) /metrics needs one of them (csm_jax.server.keys); none: all are open. Prometheus metrics
    (csm_jax.server.metrics) at /metrics."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    talks = Conversations(conversations, max_conversations if conversations is not None else 0)

    @asynccontextmanager
    async def lifespan(app):
        driver.start_thread(warmup=warmup)
        yield
        talks.close_all()
        driver.shutdown(0)
        await asyncio.to_thread(driver.close)

    app = FastAPI(title="csm-jax speech server", lifespan=lifespan)
    app.state.ended, app.state.in_flight = [], set()  # see AccessLog
    drain = app.state.drain = Drain(shutdown_grace, app.state.in_flight,
                                    end=lambda: (talks.close_all(), driver.shutdown(0)))
    # Middleware, innermost first (each added wraps the ones before): what a request meets is AccessLog (its id,
    # its line), HeaderLimit, RequireKey, RefuseWhileDraining, then the routes.
    app.add_middleware(RefuseWhileDraining, drain=drain, paths={"/v1/audio/speech", "/v1/converse"})
    open_paths = {"/health", "/converse"} | (set() if metrics_auth else {"/metrics"})
    app.add_middleware(RequireKey, keys=ApiKeys(api_keys), open_paths=open_paths)
    app.add_middleware(HeaderLimit)
    app.add_middleware(AccessLog, on_end=app.state.ended, in_flight=app.state.in_flight)
    app.state.driver, app.state.conversations, app.state.fatal = driver, talks, None
    app.state.begin_shutdown = lambda: driver.shutdown(shutdown_grace)

    def fatal(e: BaseException) -> None:  # from the driver's thread: it ended for good (e.g. its warm-up failed)
        app.state.fatal = driver.stopped_because()
        stop = getattr(app.state, "stop_serving", None)
        if stop is not None:
            stop()

    driver.on_fatal = fatal

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), **(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(400, str(exc)[:300])

    @app.get("/health")
    def health():
        body = {"status": "ok", **driver.stats(), **talks.stats()}
        if driver.fatal is not None:
            return ASCIIJSONResponse({**body, "status": "failed", "error": driver.stopped_because()}, 503)
        if drain.draining:
            return ASCIIJSONResponse({**body, "status": "draining"}, 503)
        if driver.stopping:
            return ASCIIJSONResponse({**body, "status": "shutting_down"}, 503)
        if driver.warming:
            return ASCIIJSONResponse({**body, "status": "warming"}, 503)
        failure = driver.failure
        if failure is not None:
            return ASCIIJSONResponse({**body, "status": "error", "error": failure}, 503)
        return body

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "csm-jax"}]}

    @app.get("/metrics")
    def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    add_speech_routes(app, driver, voices, max_body_bytes, request_timeout)
    if conversations is not None:
        add_conversation_routes(app, talks, ws_start_timeout, ws_idle_timeout)
    metrics = Metrics(driver, talks, app.state.in_flight, {route.path for route in app.routes})
    app.state.ended.append(metrics.ended)
    driver.on_step = metrics.step
    return app
