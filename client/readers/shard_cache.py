"""Trainer-side shard cache: global sample ids in, decoded samples out.

`ShardCache` streams the MDS shards of a dataset from its remote (any remote
mosaicml-streaming supports, local paths included) into a local cache and reads samples with
streaming's per-shard readers. It is built on streaming's downloaders (download, hash check,
decompress: `shard_fetch.prepare_shard`), `reader.get_item` and `reader.evict`, not on
`StreamingDataset`, so it needs no shared memory, no torch.distributed and leaves nothing in
/dev/shm.

Correctness rules it keeps:
- The remote's index.json is fetched on every open and its fingerprint
  (`croupier.format.fingerprint.index_fingerprint`) must equal the one the server announced.
  The cache directory is `<cache_root>/<fingerprint>/`, so a rewritten dataset gets a new
  directory and old and new samples never mix.
- A shard that is missing on the remote, or whose bytes fail the index's hash, raises a
  `DatasetError` naming the file (and the expected and actual hash); shards left by an
  earlier run are verified on first use in each process (`shard_fetch`).
- Several processes (all ranks and DataLoader workers of a node) may share one cache
  directory: per-shard lock files say who keeps a shard, and a shard another process keeps
  is never deleted (`shard_lock`).

A local folder's compressed shard is decompressed into the cache from where it is (no copy
of the compressed file first); an uncompressed one is copied, so that the cache's file keeps
its bytes when the folder's file is rewritten in place.

Scheduling: `prefetch(ids)` records the ids a rank will read and background threads
download the shards in order of first need; with `cache_limit` the cache evicts like
Belady's rule within what it knows (`eviction`). `get(ids)` never waits on the limit.

The parts, each in its own module: `eviction` (the policy), `shard_fetch` (download and
verification), `shard_lock` (the lock files), `shard_runtime` (one process's state),
`prefetch_pool` (download threads shared by several caches).

Fork safety: nothing that cannot cross a fork (threads, locks, file descriptors, cloud
clients) exists before first use in a process; a process that finds a cache made by its
parent builds its own runtime and closes only its copies of the parent's descriptors.

`ShardStore` is the former name of `ShardCache`, kept as a deprecated alias.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from croupier.client.readers.prefetch_pool import PrefetchPool
from croupier.client.readers.shard_fetch import DatasetFiles, open_readers, shard_name
from croupier.client.readers.shard_runtime import ShardRuntime, zero_counters
from croupier.errors import ConfigError, DatasetError, FingerprintMismatch
from croupier.format.fingerprint import cache_dir_name
from croupier.format.mds_index import INDEX_BASENAME, MDSIndex


class ShardCache:
    """Reads samples of one MDS dataset by global id through a local, shared shard cache.

    remote: where the dataset's index.json and shards live (local path, s3://, gs://, ...).
    cache_root: local cache root; the shards go to `<cache_root>/<fingerprint>/`.
    fingerprint: the dataset fingerprint the server announced; None skips the check.
    cache_limit: bytes of decompressed shards this cache keeps (None: no limit). It must hold
        the largest shard.
    prefetch_threads: background download threads (0: `prefetch` only records needs).
    download_attempts: attempts per file before a download error is final.
    download_timeout: seconds per file download.
    allow_unsafe_types: accept shards with pickle columns (arbitrary code on decode).
    index_bytes: the dataset's index.json when the caller has it (a node agent's cache): then
        the remote's is not fetched. Its fingerprint is checked all the same.
    prefetch_pool: download threads shared with other caches (a mixture's sources): the cache
        then starts no threads of its own and `prefetch_threads` is ignored.
    hold_prefetch: `prefetch` records needs but loads nothing until `start_prefetch()`. A
        reader of a local folder holds them while it reads its first step: its own thread then
        loads that step's shards at once, with no download thread contending with it for the
        interpreter, and later steps are prefetched while the trainer works on the first.
    share_index: also keep a copy of the index.json in the cache directory, for the processes
        that read the cache through a node agent (`croupier.client.agent`) and do not fetch it.

    The index.json is fetched and checked at construction, so a wrong remote or a rewritten
    dataset fails at once. Counters from `stats()` are per process.
    """

    def __init__(self, remote: str | Path, cache_root: str | Path, fingerprint: str | None = None,
                 cache_limit: int | None = None, prefetch_threads: int = 4, *,
                 download_attempts: int = 2, download_timeout: float = 60.0,
                 allow_unsafe_types: bool = False, index_bytes: bytes | None = None,
                 prefetch_pool: PrefetchPool | None = None, hold_prefetch: bool = False,
                 share_index: bool = False) -> None:
        if cache_limit is not None and (isinstance(cache_limit, bool) or int(cache_limit) <= 0):
            raise ConfigError(f"cache_limit must be a positive number of bytes or None, got {cache_limit!r}")
        if isinstance(prefetch_threads, bool) or not isinstance(prefetch_threads, int) or prefetch_threads < 0:
            raise ConfigError(f"prefetch_threads must be an integer >= 0, got {prefetch_threads!r}")
        if download_attempts < 1:
            raise ConfigError(f"download_attempts must be >= 1, got {download_attempts}")
        if download_timeout <= 0:
            raise ConfigError(f"download_timeout must be > 0 seconds, got {download_timeout}")
        self.remote = str(remote)
        self.cache_root = Path(cache_root)
        self.cache_limit = None if cache_limit is None else int(cache_limit)
        self.prefetch_threads = prefetch_threads
        self.prefetch_pool = prefetch_pool
        self._hold_prefetch = bool(hold_prefetch)
        self.download_attempts = int(download_attempts)
        self.download_timeout = float(download_timeout)

        if index_bytes is None:
            index_bytes = _fetch_index(self.remote, self.cache_root, self.download_timeout)
        mds = MDSIndex(index_bytes, where=f"{INDEX_BASENAME} at {self.remote}")
        got = mds.fingerprint
        if fingerprint is not None and got != fingerprint:
            raise FingerprintMismatch(f"dataset at {self.remote}", fingerprint, got)
        self.fingerprint = got
        self.local = self.cache_root / cache_dir_name(got)
        if share_index:
            _store_index(self.local / INDEX_BASENAME, index_bytes)

        self.entries = mds.shards
        self.index = mds.table
        try:
            readers = open_readers(mds.obj, str(self.local), allow_unsafe_types)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"index.json at {self.remote} is not a readable MDS index: {e}") from e
        self.hash_algorithm = mds.hash_algorithm(stored=True)
        self.raw_hash_algorithm = mds.hash_algorithm(stored=False)
        self._files = DatasetFiles(self.remote, self.local, readers, self.entries, self.hash_algorithm,
                                   self.raw_hash_algorithm, self.download_attempts, self.download_timeout)
        self._disk_bytes = self._files.disk_bytes
        self._fetch_bytes = self._files.fetch_bytes
        if self.cache_limit is not None and self.cache_limit < int(self._disk_bytes.max()):
            big = int(self._disk_bytes.argmax())
            raise ConfigError(f"cache_limit {self.cache_limit} bytes cannot hold shard "
                              f"{shard_name(readers[big])} of {int(self._disk_bytes[big])} bytes")
        self._rt: ShardRuntime | None = None
        self._rt_lock = threading.Lock()
        self._rt_lock_pid = os.getpid()

    # -- public API ----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return self.index.num_samples

    @property
    def num_shards(self) -> int:
        return self.index.num_shards

    @property
    def dataset_bytes(self) -> int:
        """Decompressed bytes of all shards (what a full cache holds)."""
        return int(self._disk_bytes.sum())

    @property
    def shard_sizes(self) -> np.ndarray:
        """Decompressed bytes of each shard (what it takes in the cache), by shard index."""
        return self._disk_bytes.copy()

    def shard_fetch_bytes(self, shards: np.ndarray | Sequence[int]) -> int:
        """Bytes a download of the given shards transfers (compressed size when compressed)."""
        return int(self._fetch_bytes[np.asarray(shards, dtype=np.int64)].sum())

    def get(self, ids: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        """Decoded samples of `ids`, in the given order (blocks on shards not yet local)."""
        return self._runtime().get(ids)

    def prefetch(self, ids: np.ndarray | Sequence[int]) -> None:
        """Record future reads of `ids` and fetch their shards in the background, first need first."""
        self._runtime().prefetch(ids)

    def release(self, ids: np.ndarray | Sequence[int]) -> None:
        """Mark prefetched `ids` as consumed so their shards may be evicted."""
        self._runtime().release(ids)

    def start_prefetch(self) -> None:
        """Ends `hold_prefetch`: recorded and later needs are loaded in the background."""
        if not self._hold_prefetch:
            return
        self._hold_prefetch = False
        rt = self._rt
        if rt is not None and rt.pid == os.getpid():
            rt.start_prefetch()

    def is_resident(self, shard: int) -> bool:
        """Whether the shard is in the cache now, as this process sees it."""
        return self._runtime().resident_now(int(shard))

    def make_present(self, shard: int) -> None:
        """Makes the shard present in the cache (downloading it when absent) without reading it;
        it stays while recorded needs or another process keep it."""
        rt = self._runtime()
        rt.acquire(int(shard))
        rt.unuse(int(shard))

    def open(self) -> None:
        """Builds this process's runtime now (imports the downloader, scans the cache) instead
        of at the first read: for a caller that must not pay for it later (a node agent's loop)."""
        self._runtime()

    def stats(self) -> dict[str, float]:
        """Counters of this process: bytes_downloaded, shards_downloaded, shards_reused,
        cache_repairs (cached shards found corrupt and fetched again), evictions, samples_read,
        wait_seconds (get blocked on shards), cache_bytes, peak_cache_bytes, pinned_shards,
        pending_ids."""
        rt = self._rt
        if rt is None or rt.pid != os.getpid():
            return dict(zero_counters(), cache_bytes=0, peak_cache_bytes=0, pinned_shards=0, pending_ids=0)
        return rt.stats()

    def close(self) -> None:
        """Stop the prefetch threads and unpin every shard; the cache stays on disk for reuse.

        The cache may be used again afterwards (it starts a fresh runtime)."""
        rt = self._rt
        if rt is not None and rt.pid == os.getpid():
            rt.close()
            self._rt = None

    def __enter__(self) -> ShardCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rt"] = None
        state["_rt_lock"] = None
        state["_rt_lock_pid"] = -1
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"ShardCache(remote={self.remote!r}, local={str(self.local)!r}, shards={self.num_shards}, "
                f"samples={self.num_samples}, cache_limit={self.cache_limit})")

    # -- per-process runtime -------------------------------------------------------------------
    def _runtime(self) -> ShardRuntime:
        pid = os.getpid()
        rt = self._rt
        if rt is not None and rt.pid == pid:
            return rt
        if self._rt_lock_pid != pid:  # a fresh child: the parent's lock may have been held at fork
            self._rt_lock = threading.Lock()
            self._rt_lock_pid = pid
        with self._rt_lock:
            rt = self._rt
            if rt is None or rt.pid != pid:
                if rt is not None:
                    rt.forget()
                rt = self._rt = ShardRuntime(self._files, self.index, self.cache_limit, self.prefetch_threads,
                                             self.prefetch_pool, held=self._hold_prefetch)
        return rt


ShardStore = ShardCache
"""Deprecated: the former name of `ShardCache` (same class); new code uses `ShardCache`."""


def _fetch_index(remote: str, cache_root: Path, timeout: float) -> bytes:
    """The bytes of the remote's index.json (always fetched: a cached copy may be stale)."""
    from croupier.format.streaming_lib import CloudDownloader

    source = os.path.join(remote, INDEX_BASENAME)
    if "://" not in remote:  # a local folder: read in place (what a download would copy)
        try:
            return Path(source).read_bytes()
        except FileNotFoundError as e:
            raise DatasetError(f"no {INDEX_BASENAME} at {remote}: {e}") from e
        except OSError as e:
            raise DatasetError(f"cannot read {source}: {e}") from e
    incoming = cache_root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f"index.{os.getpid()}.{uuid.uuid4().hex}.json"
    try:
        CloudDownloader.direct_download(source, str(tmp), timeout)
        return tmp.read_bytes()
    except FileNotFoundError as e:
        raise DatasetError(f"no {INDEX_BASENAME} at {remote}: {e}") from e
    except Exception as e:
        raise DatasetError(f"cannot fetch {source}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _store_index(path: Path, data: bytes) -> None:
    """Write the dataset's index.json into its cache dir unless an identical copy is there.

    Renamed into place, not fsynced: it is a cache of the remote's copy, compared with the
    fetched bytes on every open and rewritten when it differs (a crash can cost a rewrite,
    never a wrong read)."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


__all__ = ["PrefetchPool", "ShardCache", "ShardStore"]
