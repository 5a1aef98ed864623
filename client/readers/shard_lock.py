"""The per-shard lock files that let every process of a node share one shard cache.

Each shard has a lock file under `<cache dir>/.locks/`. A process holds it shared while it
keeps the shard ("pinned": its files must stay), takes it exclusively to download or check
the shard, and deletes a shard only when it can take the lock exclusively without waiting,
i.e. when no other process has it pinned. `flock` locks go with the process, so a killed
reader never leaves a shard locked.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path


class ShardLocks:
    """The lock files of one dataset's shards (`names`: one file name per shard)."""

    def __init__(self, lock_dir: Path, names: Sequence[str]) -> None:
        self.lock_dir = Path(lock_dir)  # made by the first `open`
        self._names = list(names)

    def path(self, s: int) -> str:
        return str(self.lock_dir / (self._names[s] + ".lock"))

    def open(self, s: int) -> int:
        """A new descriptor of shard s's lock file (unlocked)."""
        try:
            return os.open(self.path(s), os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the first lock of this cache directory
            self.lock_dir.mkdir(parents=True, exist_ok=True)
            return os.open(self.path(s), os.O_RDWR | os.O_CREAT, 0o644)

    @staticmethod
    def hold_shared(fd: int) -> None:
        """Waits for the lock shared (no process is downloading or checking the shard)."""
        fcntl.flock(fd, fcntl.LOCK_SH)

    @staticmethod
    def try_exclusive(fd: int) -> bool:
        """Takes the lock exclusively if no other process holds it; never waits."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    @staticmethod
    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    def delete_unless_pinned(self, s: int, fd: int | None, delete: Callable[[], None]) -> None:
        """Runs `delete` (removing shard s's files) unless another process has the shard pinned;
        closes `fd` (this process's pin, or None: a descriptor opened here)."""
        if fd is None:
            fd = self.open(s)
        try:
            if self.try_exclusive(fd):
                delete()
        finally:
            os.close(fd)


__all__ = ["ShardLocks"]
