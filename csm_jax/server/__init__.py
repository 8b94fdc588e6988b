"""An OpenAI-compatible speech server over the continuous-batching engine (FastAPI + uvicorn).

  POST /v1/audio/speech  {"model": "csm-1b", "input": "...", "voice": "alice", "response_format": "wav",
                          "speed": 1.0, "stream": true, "seed": 0}       -> audio (streamed as it is generated)
  GET  /v1/models, GET /health, GET /metrics
  GET  /converse, WebSocket /v1/converse     (when a conversation factory is given: talk to it)

One thread steps the device: the driver's (csm_jax.driver), which admits submitted requests into free engine
slots and hands each step's audio to its request; handlers only submit, cancel and read their queues. At most
`slots + max_queue` requests are admitted at once (in a slot, being prefilled, or waiting); beyond that the
answer is 429 with Retry-After, never a hang. A client that disconnects, streamed or not, frees its queue place
at once and its slot after the step under way.

Errors are JSON in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for a bad body (with
the field in `param`; also malformed HTTP), 404/405 for a wrong route, 408 for a body that arrives too
slowly, 413 for a body over `max_body_bytes` (refused before it is read whole), 431 for headers over 16 KB,
429 when full, 503 when the engine failed or the server is shutting down. A failed engine step ends every
request in flight or waiting with an error the client sees (503, or a stream cut short), /health answers 503
with the failure, and the driver resets the engine and checks it with one short utterance before it admits
requests again. At start-up /health answers 503 "warming" (with the programs compiled of the total) until
every program is compiled; a warm-up that fails ends the process with its cause. On SIGTERM the server
drains (drain.py): it keeps listening, new requests get 503 "draining" and /health 503 "draining", what is in
flight gets `shutdown_grace` seconds to finish (after that non-streamed requests get 503 and streams end),
then the process exits with 0.

Voices (voices.py) are Mimi-encoded once at start-up and given to CSM as context, so `voice="NAME"` speaks in
that voice; `voice="default"` (or none) uses no voice prompt. Extensions of OpenAI's body: `seed`
(0 .. 2**32-1, the uint32 that seeds the sampler: the same seed gives the same audio), `temperature` (0 =
greedy) and `topk` for sampling, and `max_audio_ms` (a cap on the audio).

Every response carries X-Request-Id, and every request ends in one access-log line (access.py); GET
/metrics is Prometheus' text format (metrics.py). With API
keys (keys.py) every route but /health and the /converse page needs `Authorization: Bearer KEY`
(401 otherwise); the conversation WebSocket checks it in its handshake.

Files, one job each:
  errors.py         the OpenAI error shape, BadRequest, the header limit
  keys.py           API keys: where they come from, the constant-time check, 401 for requests without one
  access.py         request ids (X-Request-Id) and one access-log line per request, when it ends
  logs.py           the log's format: plain, or one JSON object a line
  metrics.py        Prometheus metrics at /metrics, a registry per app
  speech.py         POST /v1/audio/speech: the body checked (`parse_speech`), audio streamed or whole
  conversations.py  the conversation WebSocket protocol and the registry of open conversations
  voices.py         named voice prompts from a folder
  drain.py          the drain on SIGTERM: no new work, what is in flight finishes, then the process exits
  protocol.py       uvicorn: header timeout, malformed HTTP as JSON, signals, start-up failure (`serve`)
  app.py            `create_app`: the routes and the driver wired together
"""

from csm_jax.server.app import create_app
from csm_jax.server.protocol import serve
from csm_jax.server.speech import parse_speech
from csm_jax.server.voices import load_voices

__all__ = ["create_app", "load_voices", "parse_speech", "serve"]
