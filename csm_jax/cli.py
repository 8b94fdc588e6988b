"""Shared entry point of the command-line scripts: a user's mistake is one clear line and exit status 2."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

import tyro

T = TypeVar("T")

USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError, ImportError)


def run(main: Callable[[T], None], spec, description: str | None) -> None:
    """Parses the command line with tyro into `spec` and calls `main`; user errors print `error: ...`."""
    args = tyro.cli(spec, description=description)
    try:
        main(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
