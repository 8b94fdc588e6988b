"""Conversations over a WebSocket (csm_jax.converse): GET /converse is a page that streams the microphone to
/v1/converse and plays the reply as it streams back.

With API keys (csm_jax.server.keys), the handshake carries one (`Authorization: Bearer KEY`, or from a browser
the subprotocols `csm-jax` and `csm-jax.key.<KEY in base64url>`); without, the answer is 401 before the upgrade.

Protocol: the client sends {"type": "start", "sample_rate": SR} first, then binary messages of float32 mono
samples at SR, and {"type": "end_turn"} to end a turn at once (push to talk; otherwise voice activity ends
it). The server sends JSON events {"type": "ready" | "speech_start" | "user" | "reply" | "barge_in" |
"no_words" | "turn" | "error", ...} and the reply audio as binary 16-bit PCM, 24 kHz mono. Each connection
holds one conversation (its own CSM context); at most `Conversations.limit` at once, more are refused with
close code 1013. A client that goes away stops its reply and frees its conversation. Close codes: 1003 when
the first message is not a valid start (after an error event), 1008 when no start arrives within
`start_timeout` seconds or nothing arrives for `idle_timeout` seconds while no reply is under way, 1011 when
a conversation cannot be made.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from csm_jax.audio import pcm16
from csm_jax.server.keys import SUBPROTOCOL


class Conversations:
    """The conversations open now, one per WebSocket (at most `limit`), made by `factory` (sample_rate ->
    (Conversation, TurnDetector), csm_jax.converse.ConverseOptions.factory); None: no conversations."""

    def __init__(self, factory: Callable | None, limit: int):
        self.factory, self.limit = factory, limit
        self.open: dict[object, object] = {}  # a token per connection -> its LiveSession (None while it starts)
        self.closed_mid_reply = 0  # conversations whose client went away while a reply was being made

    def enter(self) -> object | None:
        """A token for a new conversation; None when `limit` are open."""
        if len(self.open) >= self.limit:
            return None
        token = object()
        self.open[token] = None
        return token

    def leave(self, token: object, mid_reply: bool) -> None:
        """The conversation is over (closed); `mid_reply`: its client went away while a reply was made."""
        self.open.pop(token, None)
        self.closed_mid_reply += mid_reply

    def close_all(self) -> None:
        """Stops every conversation's reply and worker at once (the server stops)."""
        for session in list(self.open.values()):
            if session is not None:
                session.close(timeout=0)

    def stats(self) -> dict:
        return {"conversations": len(self.open), "conversations_closed_mid_reply": self.closed_mid_reply}


def add_conversation_routes(app: FastAPI, conversations: Conversations, start_timeout: float,
                            idle_timeout: float) -> None:
    from importlib.resources import files

    from fastapi.responses import HTMLResponse

    from csm_jax.converse import LiveSession, TurnLog

    page = (files("csm_jax") / "web" / "converse.html").read_text(encoding="utf-8")

    @app.get("/converse")
    def converse_page():
        return HTMLResponse(page)

    @app.websocket("/v1/converse")
    async def converse(ws: WebSocket):
        await ws.accept(SUBPROTOCOL if SUBPROTOCOL in ws.scope.get("subprotocols", ()) else None)
        token = conversations.enter()
        if token is None:
            await ws.close(1013, f"all {conversations.limit} conversations are in use; try again later")
            return
        session = None
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
                    await ws.send_bytes(pcm16(value).tobytes())
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
                conv, detector = await asyncio.to_thread(conversations.factory, sr)
            except Exception as e:  # noqa: BLE001 - told to the client, the server goes on
                emit("error", f"cannot start a conversation: {e}")
                close = (1011, "cannot start a conversation")
                return
            session = conversations.open[token] = LiveSession(conv, detector, emit)
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
            mid_reply = session is not None and session.replying.is_set()
            if session is not None:
                await asyncio.to_thread(session.close)  # stops the reply at its next frames and ends the worker
            conversations.leave(token, mid_reply)
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
