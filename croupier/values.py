"""Values as people write them on a command line or in a config file: sizes and weight lists.

One reader each, shared by every command that takes them (`--cache-limit 200GiB`,
`--weights 1,2,3` or `--weights @FILE`), so the same text means the same thing everywhere.
"""

from __future__ import annotations

import re
from pathlib import Path

from croupier.errors import ConfigError

__all__ = ["parse_size", "parse_weights"]

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
          "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'64MiB', '100mb', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read size {text!r}; use bytes or a unit like 64MiB, 100MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


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
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--weights must be comma-separated numbers, got {text[:60]!r}") from None
