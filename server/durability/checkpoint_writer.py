"""Writing a job's checkpoints and its generated-step mark, off the job lock, surviving bad disks.

The job takes an immutable snapshot under its lock (a `CheckpointMeta` record and the
sampler state bytes, O(clusters)) and hands it here; the file is written and fsynced
without the lock. Automatic checkpoints go to a background thread, in order; checkpoints a caller waits for (a trainer's token, shutdown) are written in the
caller's thread.

**Generated-step mark.** `generated.mark` is a few bytes naming the highest step the
server may have generated. Any step up to it can be regenerated after a restart (the
sequence is deterministic and every online change is durable before it takes effect), so a
restarted server accepts reconnecting ranks anywhere up to mark + max lag + lookahead,
whatever the checkpoint interval. It also records how many online changes the event log
held and their running digest (`records`; rewritten after every change), so a restart can
tell a log that lost or altered a change the job already acknowledged (`log_copies`).

**Faults.** A failed write (read-only, deleted or full state directory) is logged at ERROR
with the path and errno, once per retry window; it is retried with exponential backoff
(1 s doubling to 30 s), counted, and exposed through `health()`, which status, metrics and
the health service read. It never fails a rank's call. The `fault_hook` (called with the
target path before every write) lets tests inject such faults.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from croupier import __version__
from croupier.errors import StateError
from croupier.server.durability.checkpoint_store import CheckpointStore, atomic_write_bytes

log = logging.getLogger(__name__)

META_FORMAT = "croupier.checkpoint"
META_VERSION = 2
MARK_NAME = "generated.mark"
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0
MAX_PENDING = 4
"""Automatic checkpoints queued at most; past it the oldest pending one is dropped."""


@dataclass(frozen=True)
class CheckpointMeta:
    """The job facts stored beside the sampler state in a checkpoint file (typed, versioned).

    Version 1 files (an untyped dict with the same keys, no `meta_version`) load as well.
    """

    job: str
    sampler_fingerprint: str
    dataset_fingerprint: str
    global_batch: int
    seed: int
    policy: dict[str, Any]
    world: int | None
    formed_at: int
    generated_step: int
    formation: tuple[int, int] | None
    ranks: dict[int, int]
    events: tuple[dict[str, Any], ...]
    n_events: int
    end_step: int | None
    server_version: str = __version__
    created: float = field(default_factory=time.time)
    events_in_log: bool = False
    adapt_bytes: int = 0
    tokens_bytes: int = 0
    events_digest: str = ""  # the running digest of the first n_events log records ("": not recorded)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = META_FORMAT
        d["meta_version"] = META_VERSION
        d["formation"] = list(self.formation) if self.formation else None
        d["ranks"] = {str(r): s for r, s in self.ranks.items()}
        d["events"] = list(self.events)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> CheckpointMeta:
        version = d.get("meta_version", 1)
        if version not in (1, META_VERSION):
            raise StateError(f"checkpoint {where} has metadata version {version}; this croupier reads "
                             f"1 and {META_VERSION}")
        try:
            events = tuple(d.get("events") or ())
            formation = d.get("formation")
            return cls(
                job=str(d.get("job", "")), sampler_fingerprint=str(d["sampler_fingerprint"]),
                dataset_fingerprint=str(d.get("dataset_fingerprint", "")), global_batch=int(d["global_batch"]),
                seed=int(d.get("seed", 0)), policy=dict(d.get("policy") or {}),
                world=int(d["world"]) if d.get("world") else None, formed_at=int(d.get("formed_at", 0)),
                generated_step=int(d.get("generated_step", d.get("step", 0))),
                formation=(int(formation[0]), int(formation[1])) if formation else None,
                ranks={int(r): int(s) for r, s in (d.get("ranks") or {}).items()}, events=events,
                n_events=int(d.get("n_events", len(events))),
                end_step=None if d.get("end_step") is None else int(d["end_step"]),
                server_version=str(d.get("server_version", "")), created=float(d.get("created", 0.0)),
                events_in_log=bool(d.get("events_in_log", False)), adapt_bytes=int(d.get("adapt_bytes", 0)),
                tokens_bytes=int(d.get("tokens_bytes", 0)), events_digest=str(d.get("events_digest", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"checkpoint {where} has malformed metadata: {exc!r}") from None


@dataclass(frozen=True)
class WriterHealth:
    """What status and metrics show of the checkpoint writer."""

    ok: bool
    error: str
    failures: int
    mark: int


class CheckpointWriteError(Exception):
    """A checkpoint a caller waits for could not be written (the OSError is the cause)."""


class CheckpointWriter:
    """Writes checkpoints and the mark of one `CheckpointStore` (see the module docstring)."""

    def __init__(self, store: CheckpointStore, on_written: Callable[[int], None],
                 fault_hook: Callable[[Path], None] | None = None) -> None:
        self.store = store
        self.fault_hook = fault_hook
        self._on_written = on_written
        self._cond = threading.Condition()
        self._pending: collections.deque[tuple[int, dict[str, Any], bytes]] = collections.deque(maxlen=MAX_PENDING)
        self._pending_mark: int | None = None
        self._mark = -1
        self._error = ""
        self._failures = 0
        self._retry_at = 0.0
        self._delay = RETRY_FIRST_S
        self._last_logged = -1e18
        self._stopping = False
        self._busy = False
        self._mark_fp = ""
        self.records: tuple[int, str] | None = None  # the event log's (record count, digest), set by the job
        self._mark_records: tuple[int, str] | None = None  # what the durable mark records of it
        self._io = threading.Lock()  # one writer of the directory at a time
        self._thread = threading.Thread(target=self._run, name="croupier-checkpoint-writer", daemon=True)
        self._thread.start()

    # -- the mark ---------------------------------------------------------------------------------
    @property
    def mark_path(self) -> Path:
        return self.store.dir / MARK_NAME

    def read_mark(self, fingerprint: str) -> int:
        """The generated-step mark left by a previous server of this sampler; -1 when none."""
        try:
            d = json.loads(self.mark_path.read_bytes())
            if d.get("sampler_fingerprint") != fingerprint:
                log.warning("generated-step mark belongs to another sampler; ignored",
                            extra={"event": "mark_foreign", "path": str(self.mark_path),
                                   "got": d.get("sampler_fingerprint"), "expected": fingerprint})
                return -1
            self._mark = int(d["generated_step"])
            if "events" in d:
                self._mark_records = (int(d["events"]), str(d["events_digest"]))
        except FileNotFoundError:
            return -1
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("generated-step mark unreadable; ignored",
                        extra={"event": "mark_unreadable", "path": str(self.mark_path), "reason": repr(exc)})
            return -1
        return self._mark

    @property
    def mark(self) -> int:
        """The highest generated-step mark known durable."""
        return self._mark

    @property
    def mark_records(self) -> tuple[int, str] | None:
        """(event-log records, their running digest) the durable mark records; None when it
        records none (no mark, or one written before marks recorded the log)."""
        return self._mark_records

    def submit_mark(self, step: int, fingerprint: str) -> None:
        """Asks the background thread to make `step` the durable mark."""
        with self._cond:
            self._mark_fp = fingerprint
            if self._pending_mark is None or step > self._pending_mark:
                self._pending_mark = step
            self._cond.notify()

    def write_mark_now(self, step: int, fingerprint: str) -> bool:
        """Writes the mark in this thread; False (logged, counted) when the disk refuses, or
        without trying while a failed write waits for its retry."""
        if self._error and time.monotonic() < self._retry_at:
            return False
        return self._try(lambda: self._write_mark(step, fingerprint), self.mark_path)

    def _write_mark(self, step: int, fingerprint: str) -> None:
        records = self.records
        if step <= self._mark and (records is None or records == self._mark_records):
            return
        step = max(step, self._mark)
        d: dict[str, Any] = {"sampler_fingerprint": fingerprint, "generated_step": int(step)}
        if records is not None:
            d["events"], d["events_digest"] = int(records[0]), records[1]
        self._write(self.mark_path, json.dumps(d).encode())
        self._mark = step
        if records is not None:
            self._mark_records = records

    # -- checkpoints ------------------------------------------------------------------------------
    def submit(self, step: int, meta: CheckpointMeta, state: bytes, kind: str = "auto") -> None:
        """Queues an automatic checkpoint (the oldest pending one is dropped past MAX_PENDING)."""
        with self._cond:
            self._pending.append((step, meta.to_dict(), state))
            self._cond.notify()

    def write_now(self, step: int, meta: CheckpointMeta, state: bytes, kind: str) -> Path:
        """Writes a checkpoint in this thread; CheckpointWriteError when the disk refuses."""
        path = self.store.path_of(step)
        out: list[Path] = []
        if not self._try(lambda: out.append(self._write_ckpt(step, meta.to_dict(), state, kind)), path):
            raise CheckpointWriteError(f"cannot write checkpoint {path}: {self._error}")
        return out[0]

    def _write_ckpt(self, step: int, meta: dict[str, Any], state: bytes, kind: str) -> Path:
        path = self.store.path_of(step)
        if self.fault_hook is not None:
            self.fault_hook(path)
        with self._io:
            path = self.store.write(step, meta, state, kind=kind)
        self._on_written(step)
        log.info("checkpoint written", extra={"event": "checkpoint_written", "step": step, "kind": kind,
                                              "path": str(path)})
        return path

    def _write(self, path: Path, data: bytes) -> None:
        if self.fault_hook is not None:
            self.fault_hook(path)
        with self._io:
            atomic_write_bytes(path, data)

    # -- faults -----------------------------------------------------------------------------------
    def _try(self, fn: Callable[[], Any], path: Path) -> bool:
        try:
            fn()
        except OSError as exc:
            self._failed(path, exc)
            return False
        if self._error:
            log.warning("checkpoint writes recovered", extra={"event": "checkpoint_recovered", "path": str(path),
                                                               "failures": self._failures})
        self._error, self._delay, self._retry_at = "", RETRY_FIRST_S, 0.0
        return True

    def _failed(self, path: Path, exc: OSError) -> None:
        now = time.monotonic()
        errno_name = exc.strerror or (os.strerror(exc.errno) if exc.errno else type(exc).__name__)
        self._failures += 1
        self._error = f"{path}: [errno {exc.errno}] {errno_name}"
        if now - self._last_logged >= self._delay:  # once per retry window
            self._last_logged = now
            log.error("checkpoint write failed; serving goes on, retrying with backoff",
                      extra={"event": "checkpoint_failed", "path": str(path), "errno": exc.errno,
                             "reason": errno_name, "failures": self._failures, "retry_in_s": self._delay})
        self._retry_at = now + self._delay
        self._delay = min(self._delay * 2, RETRY_MAX_S)

    def health(self) -> WriterHealth:
        return WriterHealth(ok=not self._error, error=self._error, failures=self._failures, mark=self._mark)

    # -- the background thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._pending and self._pending_mark is None
                                              or time.monotonic() < self._retry_at):
                    wait = None if self._retry_at == 0.0 else max(self._retry_at - time.monotonic(), 0.01)
                    self._cond.wait(wait)
                if self._stopping:
                    return
                job = self._pending.popleft() if self._pending else None
                mark, self._pending_mark = self._pending_mark, None
                self._busy = True
            if mark is not None and not self.write_mark_now(mark, self._mark_fp):
                with self._cond:
                    if self._pending_mark is None or mark > self._pending_mark:
                        self._pending_mark = mark
            if job is not None:
                step, meta, state = job
                if not self._try(functools.partial(self._write_ckpt, step, meta, state, "auto"),
                                 self.store.path_of(step)):
                    with self._cond:
                        if len(self._pending) < MAX_PENDING:
                            self._pending.appendleft(job)
            with self._cond:
                self._busy = False

    def flush(self, timeout: float = 30.0) -> bool:
        """Waits until nothing is pending (or the timeout); True when the queue drained."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._cond:
                if not self._pending and self._pending_mark is None and not self._busy:
                    return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5.0)
