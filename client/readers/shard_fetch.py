"""Getting one dataset's shard files into the local cache, complete and correct.

- `open_readers`: streaming's per-shard readers for an index (what the files are, how to
  decode them); `DatasetFiles`: a dataset's files as the cache sees them.
- `ShardFetcher.pin(s)`: hold shard s's lock shared with its files present and checked,
  downloading them first when no process has: the download (`prepare_shard`: fetch with
  streaming's downloader and retries, hash check, decompress, what streaming's
  `Stream.prepare_shard` does, with every file it reads closed) runs under the lock taken
  exclusively, so a node fetches each shard once however many processes read it.
- Shards found complete in the cache from an earlier run are adopted without reading them
  (`adopt_leftovers`), so start-up stays fast, and verified on first use in each process:
  size, the index's hash of the decompressed file when it records one, and the MDS sample
  header. A corrupt one is logged, reported (`on_repair`) and fetched again.
- A shard missing on the remote, or whose bytes fail the index's hash or size, is a
  `DatasetError` naming the file (and the expected and actual hash).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from croupier.client.readers.shard_lock import ShardLocks
from croupier.errors import DatasetError
from croupier.format.mds_shard import file_fault_at, header_fault_at
from croupier.format.remote import is_remote

log = logging.getLogger(__name__)

LOCK_RETRY_S = 0.002
"""How often a process waiting for another's download of a shard looks again."""


def open_readers(index: dict, local: str, allow_unsafe_types: bool) -> list[Any]:
    """streaming's reader of every shard of `index` (files under `local`); ValueError, KeyError
    or TypeError for an index it cannot read."""
    from croupier.format.streaming_lib import reader_from_json

    readers = []
    for info in index["shards"]:
        reader = reader_from_json(local, None, info)
        reader.validate(allow_unsafe_types)
        readers.append(reader)
    if not readers:
        raise ValueError("it lists no shards")
    return readers


def shard_name(reader: Any) -> str:
    """The shard's file name as the remote holds it (compressed name when compressed)."""
    raw, zip_info = reader.file_pairs[0]
    return (zip_info or raw).basename


@dataclass(frozen=True)
class DatasetFiles:
    """One dataset's shard files: where they come from and go, and how to check them."""

    remote: str
    local: Path  # the dataset's cache directory
    readers: list[Any]  # streaming's per-shard readers
    entries: list[Any]  # the index's shard entries (`croupier.format.mds_index`)
    hash_algorithm: str | None  # of the stored (possibly compressed) files
    raw_hash_algorithm: str | None  # of the decompressed files
    download_attempts: int
    download_timeout: float

    @property
    def disk_bytes(self) -> np.ndarray:
        """Decompressed bytes of each shard (what it takes in the cache)."""
        return np.array([sum(raw.bytes for raw, _ in r.file_pairs) for r in self.readers], dtype=np.int64)

    @property
    def fetch_bytes(self) -> np.ndarray:
        """Bytes a download of each shard transfers (compressed size when compressed)."""
        return np.array([sum((z or raw).bytes for raw, z in r.file_pairs) for r in self.readers], dtype=np.int64)


class ShardFetcher:
    """Downloads and verifies the shards of `files` in one process (see the module docstring)."""

    def __init__(self, files: DatasetFiles) -> None:
        self.files = files
        self.readers = files.readers
        self._fetch_bytes = files.fetch_bytes
        self.locks = ShardLocks(files.local / ".locks", [r.file_pairs[0][0].basename for r in files.readers])
        self._stream_obj: Any = None
        self.unverified = np.zeros(len(files.readers), dtype=bool)  # adopted from an earlier run, not yet checked

    def adopt_leftovers(self) -> np.ndarray:
        """The shards already complete in the cache (an earlier run), as a mask; they count as
        present, unverified. Only their sizes are looked at here."""
        adopted = np.zeros(len(self.readers), dtype=bool)
        names: dict[str, int] = {}
        try:
            with os.scandir(self.files.local) as entries:
                for e in entries:
                    try:
                        if e.is_file():
                            names[e.name] = e.stat().st_size
                    except FileNotFoundError:  # removed or renamed by another reader while we looked
                        continue
        except FileNotFoundError:
            return adopted
        for s, reader in enumerate(self.readers):
            if all(names.get(raw.basename) == raw.bytes for raw, _ in reader.file_pairs):
                adopted[s] = True
        self.unverified |= adopted
        return adopted

    def pin(self, s: int, on_repair: Callable[[], None]) -> tuple[int, int]:
        """Holds shard s's lock shared with its files complete; returns (the lock's descriptor,
        bytes fetched). `on_repair` is called when an adopted shard was found corrupt."""
        locks = self.locks
        fd = locks.open(s)
        fetched = 0
        deadline = time.monotonic() + self.files.download_timeout
        try:
            while True:
                locks.hold_shared(fd)
                if self._present(s) and (not self.unverified[s] or self._verify_adopted(s) is None):
                    return fd, fetched
                locks.unlock(fd)
                if not locks.try_exclusive(fd):  # another process is fetching or checking it
                    if time.monotonic() > deadline:
                        raise DatasetError(
                            f"shard {shard_name(self.readers[s])} in {self.files.local} is incomplete "
                            f"but another process has held its lock for {self.files.download_timeout:.0f}s "
                            f"(were its files deleted while in use?)") from None
                    time.sleep(LOCK_RETRY_S)
                    continue
                try:
                    fault = "absent" if not self._present(s) else \
                        self._verify_adopted(s) if self.unverified[s] else None
                    if fault is not None:
                        if fault != "absent":
                            log.warning("cached shard %s in %s is corrupt (%s): fetching it again",
                                        self.files.entries[s].name, self.files.local, fault)
                            on_repair()
                        self._download(s)
                        self.unverified[s] = False
                        fetched += int(self._fetch_bytes[s])
                finally:
                    locks.unlock(fd)
        except BaseException:
            os.close(fd)
            raise

    @property
    def _stream(self) -> Any:
        """streaming's `Stream` of the dataset (its downloader and retries), made at the first download."""
        if self._stream_obj is None:
            from croupier.format.streaming_lib import Stream

            self._stream_obj = Stream(remote=self.files.remote, local=str(self.files.local),
                                      download_retry=self.files.download_attempts,
                                      download_timeout=self.files.download_timeout,
                                      validate_hash=self.files.hash_algorithm, keep_zip=False)
        return self._stream_obj

    def evict(self, s: int, pin: int | None) -> None:
        """Deletes shard s's files unless another process has it pinned; releases `pin` (this
        process's, or None)."""
        self.locks.delete_unless_pinned(s, pin, self.readers[s].evict)

    def _present(self, s: int) -> bool:
        local = self.files.local
        for raw, _ in self.readers[s].file_pairs:
            try:
                if os.stat(local / raw.basename).st_size != raw.bytes:
                    return False
            except FileNotFoundError:
                return False
        return True

    def _verify_adopted(self, s: int) -> str | None:
        """Checks an adopted shard's files against the index (hash, then MDS header); None if good.

        A good shard is marked verified, so each process reads it once."""
        entry = self.files.entries[s]
        local = self.files.local
        for raw, _ in self.readers[s].file_pairs:
            algo = self.files.raw_hash_algorithm if raw.hashes else None
            fault = file_fault_at(local / raw.basename, raw, algo)
            if fault is not None:
                return f"{raw.basename}: {fault}"
        if entry.format == "mds":
            fault = header_fault_at(local / entry.raw.basename, entry.samples, entry.raw.basename)
            if fault is not None:
                return fault
        self.unverified[s] = False
        return None

    def _download(self, s: int) -> None:
        """Fetches, verifies and decompresses shard s (the caller holds its lock exclusively)."""
        reader = self.readers[s]
        remote = self.files.remote
        reader.evict()  # partial or stale files from an interrupted run
        try:
            prepare_shard(self._stream, reader)
        except FileNotFoundError as e:
            reader.evict()
            raise DatasetError(f"shard file {shard_name(reader)} is missing from {remote}: {e}") from e
        except ValueError as e:
            bad = self._hash_failure(reader) if "Checksum failure" in str(e) else None
            reader.evict()
            raise DatasetError(bad or f"cannot prepare shard {shard_name(reader)} from {remote}: {e}") from e
        except Exception as e:
            reader.evict()
            raise DatasetError(f"cannot fetch shard {shard_name(reader)} from {remote}: {e}") from e
        for raw, _ in reader.file_pairs:  # catches corruption in datasets written without hashes
            size = os.stat(self.files.local / raw.basename).st_size
            if size != raw.bytes:
                reader.evict()
                raise DatasetError(f"shard file {raw.basename} from {remote} is corrupt: "
                                   f"{size} bytes, index.json says {raw.bytes}")

    def _hash_failure(self, reader: Any) -> str | None:
        from croupier.format.streaming_lib import get_hash

        algo = self.files.hash_algorithm
        for raw, zip_info in reader.file_pairs:
            info = zip_info or raw
            path = self.files.local / info.basename
            if not path.exists() and _local_remote(self._stream):  # read in place, not copied
                path = Path(self.files.remote, info.basename)
            if not path.exists() or algo is None:
                continue
            actual = get_hash(algo, path.read_bytes())
            if actual != info.hashes.get(algo):
                return (f"shard file {info.basename} from {self.files.remote} is corrupt: "
                        f"{algo} expected {info.hashes.get(algo)}, got {actual}")
        return None


def prepare_shard(stream: Any, reader: Any) -> None:
    """Makes the shard's decompressed files present in `stream.local`: what streaming's
    `Stream.prepare_shard` does (download what is missing with the stream's downloader and
    retries, check the stream's hash, decompress, drop the compressed file unless kept), with
    every file it reads closed at once. A compressed file of a local folder is read where it
    is (no copy into the cache); an uncompressed one is copied (the cache's copy cannot change
    when the folder's file is rewritten in place).
    ValueError "Checksum failure: <file>" for bytes that fail the hash."""
    local = Path(stream.local, stream.split)
    for raw, zipped in reader.file_pairs:
        raw_path = local / raw.basename
        if raw_path.is_file():
            if zipped is not None and not stream.safe_keep_zip:
                (local / zipped.basename).unlink(missing_ok=True)
            continue
        if zipped is None:
            stream._download_file(raw.basename)
            _check_hash(stream.validate_hash, raw, raw_path.read_bytes(), raw_path)
            continue
        zip_path = local / zipped.basename
        in_place = not zip_path.is_file() and _local_remote(stream)
        if in_place:  # a local folder's compressed file is read where it is, not copied first
            zip_path = Path(stream.remote, stream.split, zipped.basename)
        elif not zip_path.is_file():
            stream._download_file(zipped.basename)
        data = zip_path.read_bytes()
        _check_hash(stream.validate_hash, zipped, data, zip_path)
        from croupier.format.streaming_lib import decompress

        tmp = raw_path.with_name(raw_path.name + ".tmp")
        tmp.write_bytes(decompress(reader.compression, data))
        os.rename(tmp, raw_path)
        if not stream.safe_keep_zip and not in_place:
            os.remove(zip_path)


def _local_remote(stream: Any) -> bool:
    """Whether the stream's remote is a folder on this machine (no scheme), not the cache itself."""
    remote = stream.remote
    return bool(remote) and not is_remote(remote) and os.path.abspath(remote) != os.path.abspath(stream.local)


def _check_hash(algo: str | None, info: Any, data: bytes, path: Path) -> None:
    """streaming's hash check of a downloaded file (none without an algorithm)."""
    if not algo:
        return
    if algo not in info.hashes:
        raise ValueError(f"Hash algorithm `{algo}` chosen for data validation does not match with those "
                         f"provided during dataset creation `{sorted(info.hashes)}`. Provide one of those.")
    from croupier.format.streaming_lib import get_hash

    if get_hash(algo, data) != info.hashes[algo]:
        raise ValueError(f"Checksum failure: {path}")


__all__ = ["DatasetFiles", "ShardFetcher", "open_readers", "prepare_shard", "shard_name"]
