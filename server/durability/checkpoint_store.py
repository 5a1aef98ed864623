"""Durable sampler checkpoints in a state directory: atomic, checksummed, a few kept.

One file per checkpoint, named by the step it resumes at (`ckpt-000000001234.bin`):

    magic b"CRPRCKPT" | version u32 | payload length u64 | sha256(payload) 32 bytes | payload
    payload = meta length u32 | meta JSON (utf-8) | SamplerState bytes

Writes go to a temporary file in the same directory, are fsynced, renamed over the target
with os.replace, and the directory is fsynced, so a crash leaves either the old or the new
file, never a torn one. Loading checks magic, version, length and checksum; a corrupt file
raises StateError, and `newest_valid` logs it loudly (WARNING) and falls back to the previous
one. Retention keeps the newest `keep` automatic checkpoints and, apart from them, the newest
`keep` made on a trainer's request (their tokens must stay resumable).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from croupier.errors import ConfigError, StateError
from croupier.format.atomic import fsync_dir, write_bytes_atomic
from croupier.server.durability.remote_state import replica_of

MAGIC = b"CRPRCKPT"
VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
_META_LEN = struct.Struct("<I")
_NAME = re.compile(r"^ckpt-(\d{12})\.bin$")
KINDS = ("auto", "token", "final")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredCheckpoint:
    """A checkpoint read back from disk: job metadata and the sampler state bytes."""

    step: int
    meta: dict[str, Any]
    state: bytes
    path: Path


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Writes `data` to `target` so that a crash leaves the old or the new content, whole; the
    folder must exist (a deleted state directory is a fault to report, not to recreate). A
    state directory kept on an object store gets the same content there before this returns
    (`remote_state`); OSError when either refuses."""
    write_bytes_atomic(target, data, make_parent=False)
    replica = replica_of(target.parent)
    if replica is not None:
        replica.put(target, data)


def encode_checkpoint(meta: dict[str, Any], state: bytes) -> bytes:
    meta_b = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    payload = _META_LEN.pack(len(meta_b)) + meta_b + state
    return _HEADER.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest()) + payload


def decode_checkpoint(data: bytes, where: str) -> tuple[dict[str, Any], bytes]:
    """(meta, state bytes) of a checkpoint file's content; StateError when it is corrupt."""
    if len(data) < _HEADER.size:
        raise StateError(f"checkpoint {where} is truncated: {len(data)} bytes, shorter than its header")
    magic, version, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(f"checkpoint {where} is not a croupier checkpoint (bad magic {magic!r})")
    if version != VERSION:
        raise StateError(f"checkpoint {where} has version {version}; this croupier reads version {VERSION}")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise StateError(f"checkpoint {where} is truncated: payload {len(payload)} bytes, header says {length}")
    if hashlib.sha256(payload).digest() != digest:
        raise StateError(f"checkpoint {where} fails its sha256 checksum: the file is corrupt")
    (meta_len,) = _META_LEN.unpack_from(payload)
    try:
        meta = json.loads(payload[_META_LEN.size:_META_LEN.size + meta_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateError(f"checkpoint {where} has unreadable metadata: {exc}") from None
    if not isinstance(meta, dict):
        raise StateError(f"checkpoint {where} metadata is not an object")
    return meta, payload[_META_LEN.size + meta_len:]


class CheckpointStore:
    """The checkpoint files of one state directory (created if missing)."""

    def __init__(self, directory: str | os.PathLike[str], keep: int = 4) -> None:
        if keep < 1:
            raise ConfigError(f"checkpoints to keep must be >= 1, got {keep}")
        self.dir = Path(directory)
        self.keep = keep
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create state directory {self.dir}: {exc.strerror}") from None
        self._kinds: dict[int, str] = {}

    def path_of(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:012d}.bin"

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, ascending (valid or not)."""
        out = []
        for entry in os.listdir(self.dir):
            m = _NAME.match(entry)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def write(self, step: int, meta: dict[str, Any], state: bytes, kind: str = "auto") -> Path:
        """Durably stores a checkpoint resuming at `step`, then prunes old ones."""
        if kind not in KINDS:
            raise ConfigError(f"unknown checkpoint kind {kind!r}; valid kinds: {', '.join(KINDS)}")
        if step in self._kinds and self._kinds[step] != "auto" and kind == "auto":
            kind = self._kinds[step]  # an automatic write never demotes a trainer's checkpoint
        meta = dict(meta, step=int(step), kind=kind)
        path = self.path_of(step)
        atomic_write_bytes(path, encode_checkpoint(meta, state))
        self._kinds[step] = kind
        self._prune()
        return path

    def load(self, step: int) -> StoredCheckpoint:
        """The checkpoint of `step`; StateError when missing or corrupt."""
        path = self.path_of(step)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StateError(f"checkpoint {path} does not exist") from None
        meta, state = decode_checkpoint(data, str(path))
        if meta.get("step") != step:
            raise StateError(f"checkpoint {path} names step {meta.get('step')}, its file name says {step}")
        self._kinds[step] = str(meta.get("kind", "auto"))
        return StoredCheckpoint(step=step, meta=meta, state=state, path=path)

    def newest_valid(self, at_or_before: int | None = None,
                     check: Callable[[StoredCheckpoint], None] | None = None,
                     skipped: list[tuple[Path, str]] | None = None) -> StoredCheckpoint | None:
        """The newest checkpoint (with step <= at_or_before, if given) that passes its checks.

        This is the one walk-back over the state directory. `check` may refuse a checkpoint
        that reads back whole (raise StateError: e.g. its sampler state does not parse). Each
        file skipped on the way is logged at WARNING with its path and the reason, and
        appended to `skipped` as (path, reason) when given.
        """
        for step in reversed(self.steps()):
            if at_or_before is not None and step > at_or_before:
                continue
            try:
                ck = self.load(step)
                if check is not None:
                    check(ck)
                return ck
            except StateError as exc:
                log.warning("checkpoint corrupt, falling back to the previous one",
                            extra={"event": "checkpoint_corrupt", "path": str(self.path_of(step)),
                                   "reason": str(exc)})
                if skipped is not None:
                    skipped.append((self.path_of(step), str(exc)))
        return None

    def set_aside(self) -> Path | None:
        """Moves every checkpoint file (and the generated-step mark and both copies of the event log) into a new
        `stale-*` folder of the state directory (what `--fresh` does); returns it, None when empty."""
        names = [f"ckpt-{s:012d}.bin" for s in self.steps()]
        names += [n for n in ("generated.mark", "events.log", "events.copy.log") if (self.dir / n).exists()]
        if not names:
            return None
        target = self.dir / time.strftime("stale-%Y%m%dT%H%M%S")
        n = 0
        while target.exists():
            n += 1
            target = self.dir / (time.strftime("stale-%Y%m%dT%H%M%S") + f"-{n}")
        target.mkdir()
        for name in names:
            os.replace(self.dir / name, target / name)
        fsync_dir(self.dir)
        self._kinds.clear()
        return target

    def _kind_of(self, step: int) -> str:
        if step not in self._kinds:
            try:
                with open(self.path_of(step), "rb") as f:
                    head = f.read(_HEADER.size + _META_LEN.size)
                    (meta_len,) = _META_LEN.unpack_from(head, _HEADER.size)
                    meta = json.loads(f.read(min(meta_len, 1 << 20)))
                self._kinds[step] = str(meta.get("kind", "auto"))
            except (OSError, ValueError, struct.error):
                self._kinds[step] = "auto"
        return self._kinds[step]

    def _prune(self) -> None:
        steps = self.steps()
        keep_auto = [s for s in steps if self._kind_of(s) == "auto"][-self.keep:]
        keep_other = [s for s in steps if self._kind_of(s) != "auto"][-self.keep:]
        keep = set(keep_auto) | set(keep_other)
        for s in steps:
            if s not in keep:
                try:
                    os.unlink(self.path_of(s))
                except FileNotFoundError:
                    pass
                self._kinds.pop(s, None)
                self._unlink_remote(self.path_of(s))

    def _unlink_remote(self, path: Path) -> None:
        """The object-store copy of a pruned checkpoint goes too (best effort: a checkpoint
        left there is an older one the next start may read, never a wrong one)."""
        replica = replica_of(self.dir)
        if replica is None:
            return
        try:
            replica.delete(path)
        except OSError as exc:
            log.warning("could not delete a pruned checkpoint from the object store",
                        extra={"event": "prune_remote_failed", "path": path.name, "reason": str(exc)})
