"""A job's state on an object store: a local working copy, every durable write also made there.

`croupier serve --state-dir s3://bucket/prefix` keeps the job's state in the bucket so it
outlives the server's host. The server works in a local directory (`--state-cache`, or a
fresh temporary one) with the same files and the same code as a local state directory; this
module makes the bucket the authority:

- **At start**, under the job's lease (`lease`), `pull` replaces the local copy with the
  bucket's (a lost disk loses nothing), and the usual checks and restore run on it.
- **While serving**, every durable write is made in the bucket before it counts: a
  checkpoint, the generated-step mark and `server.json` are each one whole object
  (`checkpoint_store.atomic_write_bytes`), and both copies of the event log are written
  whole after every appended change, before the change is acknowledged (`log_copies`). A
  write the bucket refuses is an OSError like a full disk's: the checkpoint writer retries
  and reports it, and an online change is refused (UNAVAILABLE) and cut from the local log.
  Every write first checks that the lease is held (`Lease.check`).
- What the start itself wrote or repaired locally (a new event log, a repaired copy, files
  `--fresh` set aside) goes to the bucket in one `sync` once the server is about to serve: a
  refused start leaves the bucket as it was.

Which local files are state: every file of the directory and of its `stale-*` folders except
dot-files (the lock, temporary files), the lease, and the local cache of remote sidecars.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from croupier.server.durability.lease import LEASE_NAME, Lease
from croupier.server.durability.object_store import ObjectStoreLocation

__all__ = ["RemoteState", "local_copy", "replica_of"]

CACHE_DIRS = ("remote-sidecars",)
"""Local folders of the state directory that are caches, never state."""

log = logging.getLogger(__name__)

_active: dict[Path, RemoteState] = {}
_active_lock = threading.Lock()


def replica_of(directory: Path) -> RemoteState | None:
    """The object-store copy that writes into `directory` must also reach (None: local only)."""
    if not _active:
        return None
    return _active.get(directory.resolve())


class RemoteState:
    """The bucket side of one local state directory (see the module docstring)."""

    def __init__(self, location: ObjectStoreLocation, local: Path, lease: Lease | None) -> None:
        self.location = location
        self.local = Path(local)
        self.lease = lease

    # -- start ------------------------------------------------------------------------------------
    def pull(self) -> int:
        """Replaces the local copy's state files with the bucket's; how many were fetched."""
        self.local.mkdir(parents=True, exist_ok=True)
        for rel in self._local_files():
            (self.local / rel).unlink()
        for entry in self.local.iterdir():
            if entry.is_dir() and entry.name.startswith("stale-") and not any(entry.iterdir()):
                entry.rmdir()
        names = [n for n in self.location.list() if _is_state(n)]
        for name in names:
            got = self.location.get(name)
            if got is None:
                continue  # deleted since the listing
            target = self.local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".{target.name}.pull"
            tmp.write_bytes(got.data)
            os.replace(tmp, target)
        log.info("state fetched from the object store", extra={"event": "state_pulled", "from": self.location.url,
                                                                "to": str(self.local), "objects": len(names)})
        return len(names)

    def sync(self) -> tuple[int, int]:
        """Makes the bucket hold exactly the local state files: (written, deleted). Set-aside
        folders go first and deletions before the new files, so a crash part-way leaves
        either the old state or a state the restart's checks see through."""
        self._check()
        remote = {n: e for n, e in self.location.list().items() if _is_state(n)}
        local = sorted(self._local_files(), key=lambda r: (not r.startswith("stale-"), r))
        written = 0
        for rel in [r for r in local if r.startswith("stale-")]:
            written += self._put_if_changed(rel, remote)
        gone = [n for n in remote if n not in set(local)]
        for name in gone:
            self.location.delete(name)
        for rel in [r for r in local if not r.startswith("stale-")]:
            written += self._put_if_changed(rel, remote)
        return written, len(gone)

    def _put_if_changed(self, rel: str, remote: dict[str, str]) -> int:
        data = (self.local / rel).read_bytes()
        if remote.get(rel) == hashlib.md5(data, usedforsecurity=False).hexdigest():
            return 0
        self.location.put(rel, data)
        return 1

    def _local_files(self) -> list[str]:
        out = []
        for root, dirs, files in os.walk(self.local):
            rel_root = os.path.relpath(root, self.local)
            if rel_root == ".":
                dirs[:] = [d for d in dirs if d.startswith("stale-")]
            for f in files:
                rel = f if rel_root == "." else f"{rel_root}/{f}"
                if _is_state(rel):
                    out.append(rel)
        return out

    # -- serving ----------------------------------------------------------------------------------
    def activate(self) -> None:
        """Writes into the local directory reach the bucket from now on (after a `sync`)."""
        self.sync()
        with _active_lock:
            _active[self.local.resolve()] = self

    def deactivate(self) -> None:
        with _active_lock:
            _active.pop(self.local.resolve(), None)

    def put(self, path: Path, data: bytes) -> None:
        """The bucket's copy of the state file `path` (just written locally) becomes `data`;
        OSError when the lease is not held or the bucket refuses."""
        self._check()
        self.location.put(path.name, data)

    def delete(self, path: Path) -> None:
        self._check()
        self.location.delete(path.name)

    def _check(self) -> None:
        if self.lease is not None:
            self.lease.check()


def _is_state(rel: str) -> bool:
    parts = rel.split("/")
    if any(p.startswith(".") for p in parts) or rel == LEASE_NAME or parts[0] in CACHE_DIRS:
        return False
    return len(parts) == 1 or (len(parts) == 2 and parts[0].startswith("stale-"))


def clear_cache(local: Path) -> None:
    """Removes a temporary local copy (after a clean stop)."""
    shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def local_copy(state_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """A state directory to read (`simulate --state-dir`, `report`): a local path as it is, an
    object-store URL fetched into a temporary folder (read-only: no lease is taken, nothing is
    written back)."""
    from croupier.errors import StateError
    from croupier.server.durability.object_store import ObjectStoreLocation, is_state_url

    if not is_state_url(str(state_dir)):
        yield Path(state_dir)
        return
    location = ObjectStoreLocation(str(state_dir))
    with tempfile.TemporaryDirectory(prefix="croupier-state-") as tmp:
        try:
            n = RemoteState(location, Path(tmp), None).pull()
        except OSError as exc:
            raise StateError(f"cannot read --state-dir {location.url}: {exc.strerror or exc}") from None
        if n == 0:
            raise StateError(f"state directory {location.url} does not exist (no objects under it)")
        yield Path(tmp)
