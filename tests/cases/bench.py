"""The repository root and bench's runner, for the tests of bench/ (pytest puts the checkout on sys.path)."""

from __future__ import annotations

from pathlib import Path

from bench import __main__ as bench_runner

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "bench" / "__main__.py").is_file())

__all__ = ["ROOT", "bench_runner"]
