"""Crash-safe file writes: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary file in the target's directory, is fsync'ed, renamed over
the target with `os.replace`, and the directory is fsync'ed so the rename itself survives a
power cut. This is the one implementation croupier's writers share (sidecar arrays and
manifests, build state, scoring jobs, the client's cached index, demo checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a rename into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, make_parent: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success fsync it and rename it over `target`.

    On an exception the temporary file is removed and `target` is left as it was. Without
    `make_parent` a missing folder is an error (a state directory deleted under a running
    server must show as a fault, not be silently recreated)."""
    target = Path(target)
    if make_parent:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes, *, make_parent: bool = True) -> None:
    with atomic_path(target, make_parent=make_parent) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(target: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> None:
    """`obj` as JSON (sorted keys, trailing newline)."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def write_npy_atomic(target: str | os.PathLike[str], array: np.ndarray) -> None:
    """`array` in .npy format (no pickles)."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def replace_durably(src: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Rename a finished file (already complete on disk) over `target` and fsync both directories."""
    src, target = Path(src), Path(target)
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(src, target)
    fsync_dir(target.parent)
    if src.parent.resolve() != target.parent.resolve():
        fsync_dir(src.parent)
