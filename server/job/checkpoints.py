"""When a job's checkpoints and its generated-step mark are written, and what goes into them.

Every `checkpoint_every` generated steps, on demand (a trainer's token) and on shutdown, the
job takes an immutable snapshot under its lock: a typed `CheckpointMeta` and the payload's
named sections (`checkpoint_payload`: sampler state, token tally, adapter). The background
`CheckpointWriter` (or, for a checkpoint a caller waits for, the caller's thread) writes it
without the lock.

The generated-step mark is promised MARK_AHEAD_WINDOWS lookahead windows ahead and refreshed
by the background writer when generation gets within one window of it; only a burst that
outruns the writer writes it in line, under the job's lock (the one place besides an online
change where the job writes under its lock). A refused mark write is logged and counted by
the writer: serving goes on (the mark only widens what a restarted server accepts).

Without a state directory every method is a no-op and nothing is durable.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path

from croupier.server.durability.checkpoint_payload import CheckpointPayload
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.durability.checkpoint_writer import (
    CheckpointMeta,
    CheckpointWriteError,
    CheckpointWriter,
    WriterHealth,
)
from croupier.server.job.types import CheckpointUnavailable
from croupier.server.sampling.state import SamplerState

__all__ = ["MARK_AHEAD_WINDOWS", "Checkpoints", "snapshot"]

MARK_AHEAD_WINDOWS = 4
"""The generated-step mark is kept this many lookahead windows ahead of generation."""


def snapshot(meta: CheckpointMeta, state: SamplerState, tally: bytes | None,
             adapter: bytes | None) -> tuple[CheckpointMeta, bytes]:
    """(meta with its section lengths, payload bytes) of a checkpoint."""
    payload = CheckpointPayload(sampler=state.to_bytes(), tally=tally, adapter=adapter)
    return (dataclasses.replace(meta, tokens_bytes=payload.tally_bytes, adapt_bytes=payload.adapter_bytes),
            payload.encode())


class Checkpoints:
    """The job's checkpoint schedule, mark and writes (see the module docstring).

    every: automatic checkpoint interval in generated steps (0: none).
    window: the job's lookahead (the mark moves in windows of it).
    """

    def __init__(self, store: CheckpointStore | None, fingerprint: str, every: int, window: int,
                 fault_hook: Callable[[Path], None] | None = None) -> None:
        self.fingerprint = fingerprint
        self.every = every
        self.window = window
        self._durable = -1
        self._durable_lock = threading.Lock()  # the writer thread reports written steps under it
        self._auto_submitted = 0
        self._promised = -1
        self.writer = None if store is None else CheckpointWriter(store, self._on_written, fault_hook)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    @property
    def durable_step(self) -> int:
        """The newest step a checkpoint is known written for (-1: none)."""
        return self._durable

    def read_mark(self) -> int:
        """The generated-step mark a previous server of this sampler left; -1 when none."""
        return -1 if self.writer is None else self.writer.read_mark(self.fingerprint)

    @property
    def mark_path(self) -> str:
        return "" if self.writer is None else str(self.writer.mark_path)

    def resumed(self, step: int | None, mark: int) -> None:
        """The job resumed from the checkpoint of `step` (None: from the mark alone)."""
        if step is not None:
            self._durable = step
            self._auto_submitted = step
        self._promised = max(mark, -1)

    # -- automatic checkpoints and the mark (under the job's lock) ----------------------------------
    def auto_due(self, step: int) -> bool:
        """Whether the generator's `step` is due an automatic checkpoint (not submitted yet)."""
        return (self.writer is not None and bool(self.every) and step % self.every == 0
                and step > self._auto_submitted)

    def submit_auto(self, step: int, meta: CheckpointMeta, data: bytes) -> None:
        """Queues the automatic checkpoint of `step` for the background writer."""
        if self.writer is not None:
            self.writer.submit(step, meta, data)
            self._auto_submitted = step

    def ensure_mark(self, upto: int) -> None:
        """Keeps the durable generated-step mark >= `upto` (a step about to become deliverable)."""
        w = self.writer
        if w is None:
            return
        if upto + (MARK_AHEAD_WINDOWS - 1) * self.window > self._promised:
            self._promised = upto + MARK_AHEAD_WINDOWS * self.window
            w.submit_mark(self._promised, self.fingerprint)
        if upto > w.mark:
            w.write_mark_now(self._promised, self.fingerprint)

    def records_changed(self, count: int, digest: str) -> None:
        """The event log now holds `count` records of running digest `digest`: the mark records
        it at once (in line, under the job's lock), so a restart can tell a lost change."""
        w = self.writer
        if w is None:
            return
        w.records = (count, digest)
        w.write_mark_now(max(self._promised, w.mark, 0), self.fingerprint)

    def read_mark_records(self) -> tuple[int, str] | None:
        """(records, digest) of the event log the previous server's mark recorded, or None."""
        return None if self.writer is None else self.writer.mark_records

    # -- checkpoints a caller waits for (off the job's lock) ---------------------------------------
    def write(self, step: int, meta: CheckpointMeta, data: bytes, kind: str) -> str:
        """Writes a checkpoint now; its path ("" without a state directory).
        CheckpointUnavailable when the state directory refuses the write."""
        if self.writer is None:
            return ""
        try:
            return str(self.writer.write_now(step, meta, data, kind))
        except CheckpointWriteError as exc:
            raise CheckpointUnavailable(f"{exc}; the server keeps serving and retries; try again later") from None

    def health(self) -> WriterHealth | None:
        return None if self.writer is None else self.writer.health()

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until the background writer has nothing pending; True when it drained."""
        return True if self.writer is None else self.writer.flush(timeout=timeout)

    def close(self) -> None:
        """Drains the background writer (up to 10 s) and stops it."""
        if self.writer is not None:
            self.writer.flush(timeout=10.0)
            self.writer.close()

    def stop(self) -> None:
        """Stops the background writer without draining it (a job that failed to start)."""
        if self.writer is not None:
            self.writer.close()

    def _on_written(self, step: int) -> None:
        with self._durable_lock:
            self._durable = max(self._durable, step)
