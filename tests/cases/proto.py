"""Shared by the unit and integration tests of one topic: ROOT."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
