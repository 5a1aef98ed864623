"""The repository root and bench's runner, for the tests of bench/ (bench is not an installed package)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "bench" / "__main__.py").is_file())
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import __main__ as bench_runner  # noqa: E402

__all__ = ["ROOT", "bench_runner"]
