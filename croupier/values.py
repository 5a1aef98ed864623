"""Values as people write them on a command line or in a config file: sizes and weight lists.

One reader each, shared by every command that takes them (`--cache-limit 200GiB`,
`--weights 1,2,3` or `--weights @FILE`), so the same text means the same thing everywhere.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from pathlib import Path

from croupier.bounds import INT64_MAX
from croupier.errors import ConfigError

__all__ = ["LOG_LEVELS", "parse_log_level", "parse_size", "parse_weights"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'64MiB', '100mb', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read size {str(text)[:60]!r}; use bytes or a unit like 64MiB, 100MB")
    number = Decimal(m.group(1)) * _UNITS[m.group(2).lower()]
    if number > INT64_MAX:
        raise ConfigError(f"size {str(text)[:60]!r} is over {INT64_MAX} bytes (a 64-bit count)")
    return int(number)


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    """Weights from "1,2.5,..." or "@FILE" (numbers separated by commas or whitespace)."""
    if text is None:
        return None
    if text.startswith("@"):
        try:
            text = ",".join(Path(text[1:]).read_text().split())
        except OSError as exc:
            raise ConfigError(f"cannot read weights file {text[1:]}: {exc.strerror}") from None
    try:
        weights = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers, got {text[:60]!r}") from None
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise ConfigError(f"weights must be finite numbers, got {bad[0]}")
    return weights


def parse_log_level(text: str) -> str:
    """--log-level: one of LOG_LEVELS (any case)."""
    level = str(text).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {str(text)[:40]!r}")
    return level
