"""Serve CSM over HTTP with OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, GET /health.

  python scripts/serve.py --checkpoint sesame/csm-1b --voices-dir voices/ --port 8000 --slots 8
  curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \\
       -d '{"model": "csm-1b", "input": "Hello!", "voice": "alice"}' -o hello.wav

On every local device (e.g. 8 GPUs), the slots split evenly over them: `--devices 0 --slots 256`.

Voices folder: NAME.wav (any audio format) + NAME.txt (its transcript) + optional NAME.json ({"speaker": 1}).
Requests beyond the slots wait in a bounded queue (--max-queue); when slots and queue are all taken the
answer is 429. Limits against careless or hostile clients (all errors are JSON in OpenAI's shape): bodies
over --max-body-kb get 413 before they are read whole; a request's headers, and then its body, must arrive
within --request-timeout seconds (slower connections are closed, slow bodies get 408); headers are at most
16 KB; idle keep-alive connections close after --keep-alive-timeout seconds; seeds are 0 .. 2**32-1. A failed
engine step ends the requests in flight with an error (503), /health answers 503 until the engine is reset
and checked. At start-up /health says "warming" (with the programs compiled so far) until every program is
compiled; a failure there ends the process non-zero with its cause. On SIGTERM the server drains: it keeps
listening but new requests get 503 (and /health 503 "draining"), what is in flight gets --shutdown-grace
seconds to finish, then the process exits with 0; a second signal exits at once. Every response carries
X-Request-Id (the client's, when sane); every request ends in one access-log line (--log-format plain or
json). Prometheus metrics at /metrics.

API keys (--api-key, --api-key-file, $CSM_JAX_API_KEYS): every route but /health and the /converse page then
needs `Authorization: Bearer KEY` (else 401), the conversation WebSocket too; without keys the server is open.

With the `converse` subcommand, http://HOST:PORT/converse is also a page to talk to CSM from the browser:
microphone in, speech out, transcript shown; speech recognition, an OpenAI-compatible LLM and CSM, with the
conversation's own audio as CSM context. Its options, scripts/converse.py's and --max-conversations, follow
it; `serve.py converse --help` lists them.
  python scripts/serve.py converse --llm-url http://localhost:11434/v1 --llm-model llama3.2
"""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import tyro

from csm_jax.converse import ConverseOptions
from csm_jax.engine import FRAMES_PER_CALL


@dataclasses.dataclass
class Conversations(ConverseOptions):
    """Also serve the /converse page and the /v1/converse WebSocket: talk to CSM (needs the converse extra)."""

    max_conversations: int = 2
    """Conversations at once (each holds its own CSM context)."""


@tyro.conf.configure(tyro.conf.OmitSubcommandPrefixes, tyro.conf.CascadeSubcommandArgs)
@dataclasses.dataclass
class Args:
    checkpoint: str = "sesame/csm-1b"
    """Hub repo id or local folder."""
    voices_dir: Optional[Path] = None
    """Folder of named voice prompts (see above)."""
    host: str = "127.0.0.1"
    port: int = 8000
    slots: Union[int, Literal["auto"]] = 4
    """Utterances generated at once on the device; conversations each hold one of them. auto: the most the
    device's memory holds (each slot's cache of the model's context, 2,048 positions for csm-1b, and its Mimi
    state, beside the parameters; 10% of the memory, at least 8 GiB, kept for the programs' temporaries), said
    in the log; devices that report no memory (CPUs) need a number."""
    prefill_rows: int = 8192
    """Prompt rows prefilled per engine step at most (fewer when a stream's audio is close to its playback; a
    longer prompt goes in across steps); many requests arriving together are prefilled in few steps."""
    devices: int = 1
    """Local devices to serve on (the first N of jax.local_devices(); 0: all): the slots are split evenly over
    them (data parallel, csm_jax.sharding), so --slots must be a multiple of N. 1: the default device alone."""
    max_queue: int = 16
    """Requests that may wait for a slot; more get 429."""
    frames_per_call: int = FRAMES_PER_CALL
    """Frames per engine step (smaller: lower latency to first audio)."""
    warmup: bool = True
    """Compile every program the engine can run (conversing: also the Mimi encoder for every turn length) before
    serving (/health says "warming" until then), so nothing compiles while serving; JAX's on-disk compile cache
    makes later starts quick."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """CSM's compute dtype, whatever the file stores; auto = float32 on CPU (bf16 matmuls are slow there),
    bfloat16 on GPU/TPU. Mimi decodes in float32."""
    quantize: Literal["none", "int8"] = "none"
    """int8: weight-only int8 (per-channel scales, computed at load) for the large matmul weights: half the bytes of
    bf16 per frame; codes differ a little from the unquantized model's (see benchmarks/README.md)."""
    mimi: Optional[str] = None
    """Mimi checkpoint when the CSM checkpoint has none inside."""
    tokenizer: Optional[Path] = None
    """Llama-3 tokenizer.json when the checkpoint has none."""
    converse: Union[Annotated[None, tyro.conf.subcommand("off")],
                    Annotated[Conversations, tyro.conf.subcommand("converse")]] = None
    """Conversations: `converse` and its options after it (`serve.py converse --help`)."""
    max_body_kb: int = 64
    """Largest request body in KB (1024 bytes); larger ones get 413 before they are read whole."""
    request_timeout: float = 10.0
    """Seconds for a request's headers to arrive (else the connection is closed), then for its body (else 408)."""
    keep_alive_timeout: float = 5.0
    """Seconds an idle keep-alive connection stays open."""
    shutdown_grace: float = 8.0
    """On SIGTERM (the drain): seconds what is in flight (requests in a slot or waiting, streams, conversations)
    gets to finish; then non-streamed requests get 503, streams end and conversations close. A supervisor's stop
    timeout should be longer."""
    ws_start_timeout: float = 10.0
    """Seconds a /v1/converse WebSocket has to send its start message (else closed, code 1008)."""
    ws_idle_timeout: float = 300.0
    """Seconds a conversation may send nothing while no reply plays (else closed, code 1008)."""
    api_key: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    """A key clients must send as `Authorization: Bearer KEY` (repeat the flag for several). Other users of the
    machine can read it in the process list: prefer --api-key-file or $CSM_JAX_API_KEYS (comma-separated).
    All keys given are valid; with none the server is open to anyone who can reach the port."""
    api_key_file: Optional[Path] = None
    """File of API keys, one a line (blank lines and # comments skipped)."""
    metrics_auth: bool = True
    """With API keys, /metrics needs one too (Prometheus: `authorization: {credentials_file: ...}` in its scrape
    config); --no-metrics-auth leaves it open to whoever reaches the port (e.g. a scraper inside a private
    network). Without keys it is open either way."""
    log_format: Literal["plain", "json"] = "plain"
    """The log on stderr: plain lines, or one JSON object a line (every logger; an access line's fields at the
    top level: request_id, route, status, text_chars, audio_s, first_audio_s, total_s, slot_wait_s)."""


def main(args: Args) -> None:
    import logging
    import os

    from csm_jax.bundle import memory_device, memory_limits
    from csm_jax.generate import Generator
    from csm_jax.server import create_app, load_voices, serve
    from csm_jax.server.keys import KEYS_ENV, collect_keys
    from csm_jax.server.logs import configure_logging
    from csm_jax.server.voices import read_voices

    configure_logging(args.log_format)  # also warm-up progress
    _check(args)
    keys = collect_keys(args.api_key, args.api_key_file, os.environ)
    voices = read_voices(args.voices_dir)
    mesh = _mesh(args.devices, None if args.slots == "auto" else args.slots)
    if args.slots == "auto":
        try:
            memory_limits(memory_device(mesh))
        except ValueError as e:
            raise ValueError(f"--slots auto: {e}") from None
    _check_port(args.host, args.port)  # after the checks above, before the model loads: minutes on a GPU
    gen = Generator(args.checkpoint, mimi=args.mimi, tokenizer=str(args.tokenizer) if args.tokenizer else None,
                    dtype=args.dtype, frames_per_call=args.frames_per_call,
                    quantize=args.quantize, mesh=mesh)
    slots = args.slots
    if slots == "auto":
        try:
            slots, why = gen.model.slots_that_fit()
        except ValueError as e:
            raise ValueError(f"--slots auto: {e}") from None
        logging.getLogger("serve").info("--slots auto: %d slots (%s)", slots, why)
    voices = load_voices(voices, gen.model)
    conv = args.converse
    driver = gen.driver(slots, max_queue=args.max_queue, prefill_rows=args.prefill_rows)
    # Conversations hold slots of the same engine; with --warmup the Mimi encoder is compiled for every turn length.
    factory = conv.factory(driver, args.warmup, lambda msg: logging.getLogger("serve").info("warm-up: %s", msg)) \
        if conv else None
    app = create_app(driver, voices,
                     conversations=factory, max_conversations=conv.max_conversations if conv else 0,
                     max_body_bytes=args.max_body_kb * 1024, request_timeout=args.request_timeout,
                     shutdown_grace=args.shutdown_grace, ws_start_timeout=args.ws_start_timeout,
                     ws_idle_timeout=args.ws_idle_timeout, warmup=args.warmup, api_keys=keys,
                     metrics_auth=args.metrics_auth)
    if keys:
        logging.getLogger("serve").info("%d API key(s): requests need `Authorization: Bearer KEY`", len(keys))
    else:
        logging.getLogger("serve").warning(
            "no API key (--api-key, --api-key-file, $%s): anyone who can reach %s:%d can use this server",
            KEYS_ENV, args.host, args.port)
    serve(app, args.host, args.port, header_timeout=args.request_timeout, keep_alive=args.keep_alive_timeout,
          shutdown_grace=args.shutdown_grace)


def _check(args: Args) -> None:
    """The flags' values that no server could run with, refused before anything loads."""
    at_least = [("--prefill-rows", args.prefill_rows, 1), ("--frames-per-call", args.frames_per_call, 1),
                ("--max-queue", args.max_queue, 0), ("--max-body-kb", args.max_body_kb, 1),
                ("--shutdown-grace", args.shutdown_grace, 0)]
    if args.slots != "auto":
        at_least.append(("--slots", args.slots, 1))
    if args.converse is not None:
        args.converse.check()
        at_least.append(("--max-conversations", args.converse.max_conversations, 1))
    for flag, value, least in at_least:
        if value < least:
            raise ValueError(f"{flag} {value}: give {least} or more")
    for flag, value in (("--request-timeout", args.request_timeout), ("--keep-alive-timeout", args.keep_alive_timeout),
                        ("--ws-start-timeout", args.ws_start_timeout), ("--ws-idle-timeout", args.ws_idle_timeout)):
        if not value > 0:
            raise ValueError(f"{flag} {value}: give a number of seconds above 0")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: give a port from 1 to 65535")


def _check_port(host: str, port: int) -> None:
    """Refuses a --host and --port the server could not listen on (taken by another process, an address not
    of this machine), as uvicorn would only after the model has loaded."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port's TIME_WAIT is no conflict
        try:
            sock.bind(address)
        except OSError as e:
            why = "another process listens there" if e.errno == errno.EADDRINUSE else e.strerror
            raise ValueError(f"cannot listen on {host}:{port} ({why}): stop it or give another --port"
                             + ("" if e.errno == errno.EADDRINUSE else " or --host")) from None


def _mesh(devices: int, slots: int | None):
    """A ("data", "model") mesh over the first `devices` local devices (0: all); None for one device. `slots`
    (None: chosen later) must split evenly over it."""
    import jax

    from csm_jax import sharding

    local = jax.local_devices()
    if not 0 <= devices <= len(local):
        raise ValueError(f"--devices {devices}: this machine has {len(local)} local device(s); pass at most "
                         f"{len(local)}, or 0 for all")
    mesh = sharding.device_mesh(devices or None, devices=local)
    try:
        if slots is not None:
            sharding.check_split(slots, mesh)
    except ValueError as e:
        raise ValueError(f"--slots: {e}") from None
    return mesh

