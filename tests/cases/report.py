"""Shared by the unit and integration tests of one topic: pngs_ok."""

from __future__ import annotations

from pathlib import Path


def pngs_ok(out: Path, names: list[str]) -> None:
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
