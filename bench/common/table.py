"""The benchmark row format and its text table, shared by `python -m bench` and every benchmark.

A benchmark row is a dict with the keys of `COLUMNS` ({bench, metric, value, unit, reference,
ratio, target}): the measured value, the named reference it is compared with in the same run,
and their ratio. The runner (`bench/__main__.py`) prints all rows in one table; each benchmark
run alone prints its own rows the same way. It lives here, not in the runner, so a benchmark
does not import the runner's entry module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

COLUMNS: tuple[str, ...] = ("bench", "metric", "value", "unit", "reference", "ratio", "target")


def format_value(value: Any) -> str:
    """One table cell: `-` for None, floats to about three significant places, else str()."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A fixed-width text table of benchmark rows (a missing key is shown as `-`)."""
    cells = [[format_value(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(COLUMNS)]
    line = "  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
