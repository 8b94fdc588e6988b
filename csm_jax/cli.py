"""The `csm-jax` command and what every command shares: a user's mistake is one clear line and exit status 2.

  csm-jax synthesize --text "Hello from CSM." --out hello.wav
  csm-jax synthesize --help

Each command lives in csm_jax/commands/NAME.py as an `Args` spec (parsed by tyro) and a `main(args)`;
`csm-jax NAME ...` and `python scripts/SCRIPT.py ...` run the same one with the same flags and help.
Compiled XLA programs are kept on disk (JAX's persistent compilation cache, in ~/.cache/csm-jax/xla unless
JAX_COMPILATION_CACHE_DIR says otherwise), so a second run skips the compilations of the first.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ImportError)

# name -> what it does, one line each for `csm-jax --help`; the command is csm_jax/commands/NAME.py.
COMMANDS = {
    "synthesize": "text to speech: one 24 kHz WAV per utterance; batches of lines from a file, resumable",
    "serve": "OpenAI's speech API over HTTP (POST /v1/audio/speech), optionally the /converse page",
    "converse": "talk with CSM: speech recognition -> an LLM -> CSM's voice (microphone or audio files)",
    "finetune": "fine-tune CSM on your recordings (full or LoRA): checkpoints, resume, export",
    "codec": "Mimi as a speech codec: audio file <-> int32 codes at 12.5 Hz (encode, decode)",
    "convert": "Sesame's torch-only ckpt.pt -> model.safetensors in the same layout (needs torch)",
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = "\n".join(f"  {name:<{width}}  {what}" for name, what in COMMANDS.items())
    return (f"usage: csm-jax COMMAND [OPTIONS]\n\nSesame's CSM-1B speech model and Kyutai's Mimi codec in JAX.\n\n"
            f"commands:\n{lines}\n\n`csm-jax COMMAND --help` lists a command's options.\n")


def main(argv: Sequence[str] | None = None) -> None:
    """The `csm-jax` console command: `csm-jax COMMAND [OPTIONS]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(_usage())
        sys.exit(2)
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} (csm-jax --help)",
              file=sys.stderr)
        sys.exit(2)
    command(argv[0], argv[1:], prog=f"csm-jax {argv[0]}")


def command(name: str, args: Sequence[str] | None = None, prog: str | None = None) -> None:
    """Runs the command csm_jax/commands/`name`.py on the command line `args` (default sys.argv[1:])."""
    module = importlib.import_module(f"csm_jax.commands.{name}")
    run(module.main, module.Args, module.__doc__, args=args, prog=prog)


def run(main: Callable[[T], None], spec, description: str | None, args: Sequence[str] | None = None,
        prog: str | None = None) -> None:
    """Parses the command line with tyro into `spec` and calls `main`; user errors print `error: ...`."""
    import tyro

    parsed = tyro.cli(spec, description=description, args=args, prog=prog)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "csm-jax" / "xla"))
    try:
        main(parsed)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
