"""Serve CSM over HTTP with OpenAI's speech API: POST /v1/audio/speech, GET /v1/models, GET /health.

  python scripts/serve.py --checkpoint sesame/csm-1b --voices-dir voices/ --port 8000 --slots 8
  curl -s localhost:8000/v1/audio/speech -H 'Content-Type: application/json' \\
       -d '{"model": "csm-1b", "input": "Hello!", "voice": "alice"}' -o hello.wav

Voices folder: NAME.wav (any audio format) + NAME.txt (its transcript) + optional NAME.json ({"speaker": 1}).
Requests beyond the slots wait in a bounded queue (--max-queue); when it is full the answer is 429.

With --converse, http://HOST:PORT/converse is a page to talk to CSM from the browser (microphone in, speech
out, transcript shown): speech recognition, an OpenAI-compatible LLM (--llm-url, --llm-model) and CSM, with
the conversation's own audio as CSM context (the options are scripts/converse.py's).
  python scripts/serve.py --converse --llm-url http://localhost:11434/v1 --llm-model llama3.2
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from csm_jax.converse import ConverseOptions


@dataclasses.dataclass
class Args(ConverseOptions):
    checkpoint: str = "sesame/csm-1b"
    """Hub repo id or local folder."""
    voices_dir: Optional[Path] = None
    """Folder of named voice prompts (see above)."""
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 4
    """Utterances generated at once on the device."""
    max_queue: int = 16
    """Requests that may wait for a slot; more get 429."""
    frames_per_call: int = 4
    """Frames per engine step (smaller: lower latency to first audio)."""
    mimi: Optional[str] = None
    """Mimi checkpoint when the CSM checkpoint has none inside."""
    tokenizer: Optional[Path] = None
    """Llama-3 tokenizer.json when the checkpoint has none."""
    converse: bool = False
    """Serve the /converse page and the /v1/converse WebSocket (needs the converse extra)."""
    max_conversations: int = 2
    """Conversations at once (each holds its own CSM context)."""


def main(args: Args) -> None:
    from csm_jax.engine import Engine
    from csm_jax.generate import Generator
    from csm_jax.server import create_app, load_voices, serve

    gen = Generator(args.checkpoint, mimi=args.mimi, tokenizer=str(args.tokenizer) if args.tokenizer else None,
                    frames_per_call=args.frames_per_call)
    voices = load_voices(args.voices_dir, gen)
    factory = args.factory(gen) if args.converse else None
    app = create_app(Engine(gen, args.slots, args.frames_per_call), voices, args.max_queue,
                     conversations=factory, max_conversations=args.max_conversations)
    serve(app, args.host, args.port)


if __name__ == "__main__":
    from csm_jax.cli import run

    run(main, Args, __doc__)
