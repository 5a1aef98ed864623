"""Two copies of the event log, checked against the generated-step mark: no silent change of the past.

Every online change is appended to `events.log` and to `events.copy.log` (each fsynced)
before it is acknowledged or used; after the appends the generated-step mark is rewritten
with the log's record count and running digest (`event_log.chain`), and each checkpoint
records the digest of the changes its state holds. On start (`reconcile`) the two copies are
read record by record:

- a record whole in one copy and damaged or missing in the other is repaired from the good
  copy (logged);
- records whole in both must be byte-identical (two different changes under one index is
  refused);
- the records both copies agree on must cover what the mark recorded, with the same digest:
  a change the job acknowledged (or generated steps under) that is lost or altered in both
  copies refuses the start, naming the file, the record, its offset and the steps at stake,
  and saying how to proceed (`--fresh`, or `--accept-log-damage`, which keeps the whole
  records, logs what may differ, and rewrites both copies and the mark);
- a torn tail past what the mark recorded (a crash during an append, never acknowledged) is
  dropped, as before.

A state directory from before the copies (no copy file, a mark without a record count) is
read with the old checks and upgraded: the copy is written from the log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from croupier.format.atomic import write_bytes_atomic
from croupier.server.durability.event_log import (
    GENESIS,
    HEADER,
    Event,
    chain,
    decode_payloads,
    record_bytes,
    scan,
    whole_records,
)
from croupier.server.durability.state_dir import StateDirInvalid

log = logging.getLogger(__name__)

LOG_NAME = "events.log"
COPY_NAME = "events.copy.log"

__all__ = ["COPY_NAME", "LogCheck", "MirroredLog", "digest_of", "read_mark", "reconcile"]


def read_mark(state_dir: Path) -> tuple[int, tuple[int, str] | None]:
    """(generated step, (records, digest) or None) of a state directory's generated-step mark,
    read without a job (`simulate --state-dir`); (-1, None) when it is absent or unreadable."""
    import json

    try:
        d = json.loads((state_dir / "generated.mark").read_bytes())
        records = (int(d["events"]), str(d["events_digest"])) if "events" in d else None
        return int(d["generated_step"]), records
    except (OSError, ValueError, KeyError, TypeError):
        return -1, None


@dataclass(frozen=True)
class LogCheck:
    """What `reconcile` found: the records kept, their digest, and what it repaired or dropped."""

    records: int
    digest: str
    repaired: tuple[str, ...] = ()
    dropped: int = 0
    events: tuple[Event, ...] = ()
    accepted: str = ""  # the damage accepted (--accept-log-damage), "" when none


def digest_of(payloads: list[bytes], n: int | None = None) -> str:
    """The running digest (hex) of the first n records (all when n is None)."""
    d = GENESIS
    for p in payloads[:len(payloads) if n is None else n]:
        d = chain(d, p)
    return d.hex()


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def reconcile(state_dir: Path, mark_records: tuple[int, str] | None, generated_mark: int, *,
              accept_damage: bool = False, write: bool = True) -> LogCheck:
    """Checks (and with `write`, repairs) the two copies of a state directory's event log
    against the mark's record count and digest; see the module docstring. StateDirInvalid
    when a change the job depended on is lost or altered (unless `accept_damage`)."""
    main_path, copy_path = state_dir / LOG_NAME, state_dir / COPY_NAME
    main, copy = _read(main_path), _read(copy_path)
    if main is None and copy is None and mark_records is None:
        return LogCheck(records=0, digest=GENESIS.hex())
    a, a_bad, a_rest = whole_records(main or b"")
    b, b_bad, b_rest = whole_records(copy or b"")
    if copy is None and mark_records is None:
        # A state directory from before the copies: today's checks (a torn tail dropped, damage
        # before the last record refused), then a copy is written from it.
        if main is not None:
            scan(main_path)
        kept = a
        b, b_bad, b_rest = a, None, 0
        repaired = [f"{COPY_NAME} written from {LOG_NAME} (upgrade)"] if write else []
    else:
        kept, repaired = _merge(a, b, main_path, copy_path)
    lost_at = len(kept)
    damaged = [(p, len(recs), bad, rest) for p, recs, bad, rest in ((main_path, a, a_bad, a_rest),
                                                                      (copy_path, b, b_bad, b_rest))
               if bad is not None and len(recs) <= lost_at]
    events = decode_payloads(kept, str(main_path))
    problem = _problem(kept, events, mark_records, generated_mark, damaged, main_path)
    dropped = 0
    if problem is not None:
        if not accept_damage:
            raise StateDirInvalid(problem + f"; to proceed: start over with --fresh, or pass --accept-log-damage to "
                                            f"keep the {len(kept)} whole change(s) and log which steps may differ")
        log.warning("accepting event log damage: %s", problem, extra={"event": "log_damage_accepted",
                                                                      "records": len(kept)})
        dropped = max(0, (mark_records or (0, ""))[0] - len(kept))
    elif damaged:
        for path, count, offset, rest in damaged:
            if count == lost_at:  # a torn tail past every acknowledged change: dropped
                dropped += 1
                log.warning("event log: a torn last record dropped (never acknowledged)",
                            extra={"event": "log_torn_dropped", "path": str(path), "offset": offset, "bytes": rest})
    want = HEADER + b"".join(record_bytes(p) for p in kept)
    for path, data in ((main_path, main), (copy_path, copy)):
        if data != want:
            if write:
                write_bytes_atomic(path, want)
            repaired.append(f"{path.name} rewritten with {len(kept)} record(s)")
    if repaired and write:
        log.warning("event log repaired from its other copy: %s", "; ".join(repaired),
                    extra={"event": "log_repaired", "path": str(state_dir), "records": len(kept)})
    return LogCheck(records=len(kept), digest=digest_of(kept), repaired=tuple(repaired), dropped=dropped,
                    events=tuple(events), accepted=problem if problem is not None else "")


def _merge(a: list[bytes], b: list[bytes], main_path: Path, copy_path: Path) -> tuple[list[bytes], list[str]]:
    """The records the two copies agree on: each index from whichever copy holds it whole."""
    kept: list[bytes] = []
    repaired: list[str] = []
    for i in range(max(len(a), len(b))):
        pa = a[i] if i < len(a) else None
        pb = b[i] if i < len(b) else None
        if pa is not None and pb is not None and pa != pb:
            raise StateDirInvalid(f"{main_path} and {copy_path} hold different changes as record {i}: the state "
                                  "directory was edited or mixes two jobs; restore it from a backup, or --fresh")
        got = pa if pa is not None else pb
        assert got is not None
        if pa is None or pb is None:
            repaired.append(f"record {i} restored into {(main_path if pa is None else copy_path).name}")
        kept.append(got)
    return kept, repaired


def _problem(kept: list[bytes], events: list[Event], mark_records: tuple[int, str] | None, generated_mark: int,
             damaged: list[tuple[Path, int, int | None, int]], main_path: Path) -> str | None:
    """Why the kept records cannot be trusted to replay what was delivered; None when they can."""
    last_step = events[-1].step if events else 0
    where = "; ".join(f"{p.name}: record {n} at offset {off} is damaged ({rest} bytes from there)"
                      for p, n, off, rest in damaged) or f"{main_path.name}: missing or cut short"
    if mark_records is not None:
        count, digest = mark_records
        if len(kept) < count:
            return (f"the event log lost change(s) the job acknowledged: the generated mark records {count} "
                    f"change(s), both copies hold {len(kept)} whole ({where}); steps from {last_step} to "
                    f"{max(generated_mark, last_step)} were generated under the lost change(s) and may differ")
        if digest_of(kept, count) != digest:
            return (f"the event log's first {count} change(s) differ from what the job acknowledged (digest "
                    f"mismatch against the generated mark; {where}): steps up to {generated_mark} may differ")
    elif len(damaged) == 2 and damaged[0][1] == damaged[1][1] == len(kept):
        return (f"both copies of the event log are damaged at record {len(kept)} ({where}); a crash tears only "
                f"the copy being written, so this is damage to a change that may have been acknowledged")
    return None


class MirroredLog:
    """The append side of both copies (`event_log.EventLog` each): a change is whole in both
    before `append` returns. When the copy refuses the write, the record just written to the
    log is cut off again, so a change that was refused never replays after a restart."""

    def __init__(self, state_dir: Path) -> None:
        from croupier.server.durability.event_log import EventLog

        self.main = EventLog(state_dir / LOG_NAME)
        try:
            self.copy = EventLog(state_dir / COPY_NAME)
        except BaseException:
            self.main.close()
            raise
        if len(self.copy) != len(self.main) or self.copy.digest != self.main.digest:
            self.close()
            raise StateDirInvalid(f"{state_dir / LOG_NAME} and {state_dir / COPY_NAME} differ after their check "
                                  f"({len(self.main)} and {len(self.copy)} records)")
        self.path = self.main.path
        self.paths = (self.main.path, self.copy.path)

    def __len__(self) -> int:
        return len(self.main)

    @property
    def digest(self) -> str:
        return self.main.digest

    @property
    def digests(self) -> list[bytes]:
        return self.main.digests

    @property
    def closed(self) -> bool:
        return self.main.closed

    def append(self, event: Event) -> int:
        """Appends to the log, then to its copy (each fsynced); its index."""
        import os

        size = os.fstat(self.main._file.fileno()).st_size
        index = self.main.append(event)
        try:
            copy_size = os.fstat(self.copy._file.fileno()).st_size
            self.copy.append(event)
        except BaseException:
            self.main.truncate_last(size)
            raise
        try:
            self._replicate()
        except BaseException:
            self.main.truncate_last(size)
            self.copy.truncate_last(copy_size)
            try:
                self._replicate()  # best effort: the refused change leaves the object store too
            except OSError:
                pass
            raise
        return index

    def _replicate(self) -> None:
        """A state directory kept on an object store: both copies, whole, there too."""
        from croupier.server.durability.remote_state import replica_of

        replica = replica_of(self.main.path.parent)
        if replica is not None:
            replica.put(self.main.path, self.main.path.read_bytes())
            replica.put(self.copy.path, self.copy.path.read_bytes())

    def close(self) -> None:
        self.main.close()
        self.copy.close()
