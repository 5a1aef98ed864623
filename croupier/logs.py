"""Structured logs: one JSON object per line on stderr, with the record's `extra` fields.

    log.warning("checkpoint corrupt", extra={"event": "checkpoint_corrupt", "path": p})
    -> {"ts": "...", "level": "WARNING", "logger": "croupier.server.durability.checkpoint_store",
        "msg": "checkpoint corrupt", "event": "checkpoint_corrupt", "path": "..."}
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO

_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line; extra fields become keys."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "INFO", stream: IO[str] | None = None) -> None:
    """Sends croupier's logs, as JSON lines, to `stream` (stderr by default)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("croupier")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
