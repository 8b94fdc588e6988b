"""Shared entry point of the command-line scripts: a user's mistake is one clear line and exit status 2.

Compiled XLA programs are kept on disk (JAX's persistent compilation cache, in ~/.cache/csm-jax/xla unless
JAX_COMPILATION_CACHE_DIR says otherwise), so a second run skips the compilations of the first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

import tyro

T = TypeVar("T")

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, ImportError)


def run(main: Callable[[T], None], spec, description: str | None) -> None:
    """Parses the command line with tyro into `spec` and calls `main`; user errors print `error: ...`."""
    args = tyro.cli(spec, description=description)
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        import jax

        jax.config.update("jax_compilation_cache_dir", str(Path.home() / ".cache" / "csm-jax" / "xla"))
    try:
        main(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
