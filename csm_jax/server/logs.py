"""The server's log: plain lines (`LEVEL:     logger: message key=value ...`) or one JSON object a line
(`--log-format json`: time, level, logger, message, and a record's fields, e.g. an access line's, at the top
level), for every logger of the process, uvicorn's and Python's warnings included."""

from __future__ import annotations

import json
import logging
import time

FORMATS = ("plain", "json")


class PlainFormatter(logging.Formatter):
    """`LEVEL:     logger: message`, then a record's fields as key=value (None: -)."""

    def __init__(self):
        super().__init__("%(levelname)s:     %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if not fields:
            return line
        head, newline, tail = line.partition("\n")  # a traceback stays below the fields
        pairs = " ".join(f"{k}={'-' if v is None else v}" for k, v in fields.items())
        return f"{head} {pairs}{newline}{tail}"


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) +
               f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
               "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True, default=str)


def configure_logging(fmt: str = "plain", level: int = logging.INFO) -> None:
    """One handler on the root logger (stderr) in `fmt`; uvicorn logs through it too (csm_jax.server.serve)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: use one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if fmt == "json" else PlainFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    # JAX's own INFO lines are for its developers: e.g. "Unable to initialize backend 'tpu'" at every start on a
    # machine without one, which reads like a failure. Its warnings and errors still come through.
    logging.getLogger("jax").setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)
