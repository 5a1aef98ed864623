"""The node agent's runtime directory: one agent per directory, and what it says about itself.

The directory (created 0700) holds the agent's socket, `agent.json` (pid, server, node,
agent id: what `croupier agent` and the ranks show), `stats.json` (its counters, rewritten
every few seconds and at stop) and `agent.lock`, held with `flock` while the agent runs: a
second agent on the same directory is refused (`AgentLocked`), and a killed agent's lock
goes with its process, so the next one takes over its stale socket.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from croupier.client.agent.protocol import INFO_NAME, LOCK_NAME, STATS_NAME, socket_path
from croupier.errors import ConfigError
from croupier.format.atomic import write_bytes_atomic

LOCK_ATTEMPTS = 10
"""Tries at the lock, 0.1 s apart: a rank probing it (`agent.auto`) holds it for an instant."""


class AgentLocked(ConfigError):
    """Another agent holds the runtime directory."""


class RuntimeDir:
    """One agent's hold on its runtime directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.socket = socket_path(self.path)
        self._lock_fd: int | None = None

    def take(self) -> None:
        """Creates the directory (0700) and takes its lock; refuses when another agent holds it.
        Removes a killed agent's socket."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create the agent runtime directory {str(self.path)!r}: "
                              f"{exc.strerror}") from None
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the agent's lock {str(self.path / LOCK_NAME)!r}: {exc.strerror}") from None
        for _ in range(LOCK_ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.1)
        else:
            os.close(fd)
            holder = ""
            try:
                holder = json.loads((self.path / INFO_NAME).read_text()).get("pid", "")
            except (OSError, ValueError):
                pass
            raise AgentLocked(f"another croupier agent (pid {holder or '?'}) already serves the runtime directory "
                              f"{str(self.path)!r}; one agent per node and runtime directory") from None
        self._lock_fd = fd
        if self.socket.exists() or self.socket.is_symlink():
            self.socket.unlink()  # a killed agent's socket: the lock says nobody serves it

    def write_info(self, info: dict[str, Any]) -> None:
        write_bytes_atomic(self.path / INFO_NAME, json.dumps(info).encode())

    def write_stats(self, stats: dict[str, Any]) -> None:
        """Rewrites stats.json (atomically); OSError when it cannot."""
        write_bytes_atomic(self.path / STATS_NAME, json.dumps(stats).encode())

    def remove_socket(self) -> None:
        try:
            self.socket.unlink()
        except OSError:
            pass

    def release(self) -> None:
        """Removes the socket and lets the lock go (the agent stopped)."""
        self.remove_socket()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


__all__ = ["AgentLocked", "RuntimeDir"]
