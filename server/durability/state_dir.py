"""Reading a job's state directory: the one reader the job, `simulate --state-dir` and `report` share.

A state directory holds checkpoint files (`checkpoint_store`), the generated-step mark
(`checkpoint_writer`) and the event log of online changes (`change_log`). What a reader
needs from it is always the same: the newest checkpoint that reads back whole (typed
metadata, payload sections, sampler state), optionally at or before a step, and every
online change of the job together with how many of them that checkpoint's sampler state
already holds. Changes live in `events.log`; a state directory from before the log lists
them in its checkpoint instead. Both cases are decided here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from croupier.errors import StateError
from croupier.server.durability.change_log import LOG_NAME, read_changes
from croupier.server.durability.checkpoint_payload import CheckpointPayload
from croupier.server.durability.checkpoint_store import CheckpointStore, StoredCheckpoint
from croupier.server.durability.checkpoint_writer import CheckpointMeta
from croupier.server.sampling.state import Change, SamplerState

__all__ = ["Checkpoint", "StateDir", "StateDirInvalid"]


class StateDirInvalid(StateError):
    """The state directory holds checkpoints, none of which is valid, or its parts disagree:
    refused, not reset."""


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """One checkpoint read back whole: typed metadata, payload sections and sampler state.

    `n_changes`: how many of the job's online changes (in order) its sampler state holds.
    `raw_meta`: the metadata as stored (keys a tool may look for beyond the typed ones)."""

    step: int
    path: Path
    meta: CheckpointMeta
    raw_meta: dict[str, Any]
    payload: CheckpointPayload
    state: SamplerState
    n_changes: int


class StateDir:
    """The read side of one state directory (see the module docstring)."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> StateDir:
        """An existing state directory (what the offline tools read); StateError when missing."""
        path = Path(path)
        if not path.is_dir():
            raise StateError(f"state directory {path} does not exist")
        return cls(CheckpointStore(path))

    @property
    def dir(self) -> Path:
        return self.store.dir

    @property
    def log_path(self) -> Path:
        return self.store.dir / LOG_NAME

    def newest(self, at_or_before: int | None = None, check: Callable[[Checkpoint], None] | None = None,
               skipped: list[tuple[Path, str]] | None = None) -> Checkpoint | None:
        """The newest checkpoint (step <= at_or_before, if given) that reads back whole and
        passes `check` (which refuses one by raising StateError); None when there is none.
        Each one skipped is logged and listed in `skipped` (`CheckpointStore.newest_valid`)."""
        found: list[Checkpoint] = []

        def read(ck: StoredCheckpoint) -> None:
            c = self._read(ck)
            if check is not None:
                check(c)
            found.append(c)

        if self.store.newest_valid(at_or_before=at_or_before, check=read, skipped=skipped) is None:
            return None
        return found[-1]

    def latest(self) -> tuple[Checkpoint, list[Change]]:
        """The newest valid checkpoint and every online change of the job (what `simulate
        --state-dir` and `report` replay); StateError when no checkpoint is valid."""
        ck = self.newest()
        if ck is None:
            raise StateError(f"state directory {self.dir} holds no valid checkpoint")
        return ck, self.changes(ck)

    def changes(self, ck: Checkpoint | None) -> list[Change]:
        """Every online change of the job, in order: the event log's, or (a state directory
        from before the log) the list `ck` carries. Without a checkpoint: the log's.
        StateDirInvalid when the log holds fewer changes than the checkpoint's state."""
        if ck is not None and not ck.meta.events_in_log:
            return [Change.from_dict(e) for e in ck.meta.events]
        logged = read_changes(self.dir)
        if ck is not None and len(logged) < ck.n_changes:
            raise StateDirInvalid(f"checkpoint {ck.path.name} holds {ck.n_changes} online changes but {LOG_NAME} "
                                  f"has only {len(logged)}: the event log is damaged or from another job")
        return logged

    @staticmethod
    def _read(ck: StoredCheckpoint) -> Checkpoint:
        where = str(ck.path)
        meta = CheckpointMeta.from_dict(ck.meta, where)
        payload = CheckpointPayload.decode(ck.state, ck.meta, where)
        state = SamplerState.from_bytes(payload.sampler)
        n = meta.n_events if meta.events_in_log else len(meta.events)
        return Checkpoint(step=ck.step, path=ck.path, meta=meta, raw_meta=ck.meta, payload=payload, state=state,
                          n_changes=n)
