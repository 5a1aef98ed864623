"""Trainer-side shard store: global sample ids in, decoded samples out.

The store streams the MDS shards of a dataset from its remote (any remote mosaicml-streaming
supports, local paths included) into a local cache and reads samples with streaming's
per-shard readers. It is built on `Stream.prepare_shard` (download, hash check, decompress),
`reader.get_item` and `reader.evict`, not on `StreamingDataset`, so it needs no shared memory,
no torch.distributed and leaves nothing in /dev/shm.

Correctness rules it keeps:
- The remote's index.json is fetched on every open and its fingerprint
  (`croupier.format.fingerprint.index_fingerprint`) must equal the one the server announced.
  The cache directory is `<cache_root>/<fingerprint>/`, so a rewritten dataset gets a new
  directory and old and new samples never mix.
- A shard that is missing on the remote, or whose bytes fail the index's hash, raises a
  `DatasetError` naming the file (and the expected and actual hash).
- Shards found complete in the cache from an earlier run are adopted without reading them,
  so start-up stays fast, and verified on first use in each process: size, the index's hash
  of the decompressed file when it records one, and the MDS sample header. A corrupt one is
  logged, counted (`stats()["cache_repairs"]`) and fetched again. Any failure to read a
  sample is a `DatasetError` naming the shard.
- Several processes (all ranks and DataLoader workers of a node) may share one cache
  directory. Each shard has a lock file: a process holds it shared while it keeps the shard
  ("pinned"), takes it exclusively to download, and deletes a shard only when it can take it
  exclusively without waiting, i.e. when no other process has it pinned.

Scheduling: `prefetch(ids)` records the ids a rank will read (a reference count per shard
plus the position of its next need) and background threads download the shards in order of
first need. With `cache_limit` the store evicts like Belady's rule within what it knows:
shards no pending id needs go first (least recently used first), then the one needed last.
A prefetch evicts a still-needed shard only for a shard of the next two slices (and only
one needed later than it); otherwise it waits for `release(ids)` to free room, because
evicting live shards far ahead of need re-downloads them. `get(ids)` never waits on the
limit: it evicts the least-soon-needed shard that is not being read.

Fork safety: nothing that cannot cross a fork (threads, locks, file descriptors, cloud
clients) exists before first use in a process; a process that finds a store made by its
parent builds its own runtime and closes only its copies of the parent's descriptors.
"""

from __future__ import annotations

import fcntl
import heapq
import logging
import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from croupier.errors import ConfigError, DatasetError, FingerprintMismatch
from croupier.format.atomic import write_bytes_atomic
from croupier.format.fingerprint import cache_dir_name
from croupier.format.mds_index import INDEX_BASENAME, MDSIndex
from croupier.format.mds_shard import file_fault_at, header_fault_at

log = logging.getLogger(__name__)

_ABSENT, _LOADING, _READY = 0, 1, 2
_NEVER = 1 << 62  # next_need of a shard that no pending id needs
_LIVE = 1 << 61  # eviction keys: a live shard's key is its next need (< _LIVE), a dead one's is above
_LOCK_RETRY_S = 0.002


class ShardStore:
    """Reads samples of one MDS dataset by global id through a local, shared shard cache.

    remote: where the dataset's index.json and shards live (local path, s3://, gs://, ...).
    cache_root: local cache root; the shards go to `<cache_root>/<fingerprint>/`.
    fingerprint: the dataset fingerprint the server announced; None skips the check.
    cache_limit: bytes of decompressed shards this store keeps (None: no limit). It must hold
        the largest shard.
    prefetch_threads: background download threads (0: `prefetch` only records needs).
    download_attempts: attempts per file before a download error is final.
    download_timeout: seconds per file download.
    allow_unsafe_types: accept shards with pickle columns (arbitrary code on decode).
    index_bytes: the dataset's index.json when the caller has it (a node agent's cache): then
        the remote's is not fetched. Its fingerprint is checked all the same.
    prefetch_pool: download threads shared with other stores (a mixture's sources): the store
        then starts no threads of its own and `prefetch_threads` is ignored.

    The index.json is fetched and checked at construction, so a wrong remote or a rewritten
    dataset fails at once. Counters from `stats()` are per process.
    """

    def __init__(self, remote: str | Path, cache_root: str | Path, fingerprint: str | None = None,
                 cache_limit: int | None = None, prefetch_threads: int = 4, *,
                 download_attempts: int = 2, download_timeout: float = 60.0,
                 allow_unsafe_types: bool = False, index_bytes: bytes | None = None,
                 prefetch_pool: "PrefetchPool | None" = None) -> None:
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
        _store_index(self.local / INDEX_BASENAME, index_bytes)

        self.entries = mds.shards
        self.index = mds.table
        try:
            self._readers = _readers(mds.obj, str(self.local), allow_unsafe_types)
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"index.json at {self.remote} is not a readable MDS index: {e}") from e
        pairs = [r.file_pairs for r in self._readers]
        self._disk_bytes = np.array([sum(raw.bytes for raw, _ in p) for p in pairs], dtype=np.int64)
        self._fetch_bytes = np.array([sum((z or raw).bytes for raw, z in p) for p in pairs], dtype=np.int64)
        self.hash_algorithm = mds.hash_algorithm(stored=True)
        self.raw_hash_algorithm = mds.hash_algorithm(stored=False)
        if self.cache_limit is not None and self.cache_limit < int(self._disk_bytes.max()):
            big = int(self._disk_bytes.argmax())
            raise ConfigError(f"cache_limit {self.cache_limit} bytes cannot hold shard "
                              f"{_shard_name(self._readers[big])} of {int(self._disk_bytes[big])} bytes")
        self._rt: _Runtime | None = None
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

    def stats(self) -> dict[str, float]:
        """Counters of this process: bytes_downloaded, shards_downloaded, shards_reused,
        cache_repairs (cached shards found corrupt and fetched again), evictions, samples_read,
        wait_seconds (get blocked on shards), cache_bytes, peak_cache_bytes, pinned_shards,
        pending_ids."""
        rt = self._rt
        if rt is None or rt.pid != os.getpid():
            return dict(_Runtime.zero_counters(), cache_bytes=0, peak_cache_bytes=0, pinned_shards=0,
                        pending_ids=0)
        return rt.stats()

    def close(self) -> None:
        """Stop the prefetch threads and unpin every shard; the cache stays on disk for reuse.

        The store may be used again afterwards (it starts a fresh runtime)."""
        rt = self._rt
        if rt is not None and rt.pid == os.getpid():
            rt.close()
            self._rt = None

    def __enter__(self) -> "ShardStore":
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
        return (f"ShardStore(remote={self.remote!r}, local={str(self.local)!r}, shards={self.num_shards}, "
                f"samples={self.num_samples}, cache_limit={self.cache_limit})")

    # -- per-process runtime -------------------------------------------------------------------
    def _runtime(self) -> "_Runtime":
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
                rt = self._rt = _Runtime(self)
        return rt


class _Runtime:
    """The state of one store in one process: shard states, pins, prefetch queue, threads."""

    def __init__(self, store: ShardStore) -> None:
        from streaming.base.stream import Stream

        self.pid = os.getpid()
        self.store = store
        self.readers = store._readers
        self.size = store._disk_bytes
        self.limit = store.cache_limit
        self.stream = Stream(remote=store.remote, local=str(store.local),
                             download_retry=store.download_attempts,
                             download_timeout=store.download_timeout,
                             validate_hash=store.hash_algorithm, keep_zip=False)
        self.lock_dir = store.local / ".locks"
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        n = store.num_shards
        self.cond = threading.Condition()
        self.status = np.zeros(n, dtype=np.int8)
        self.refs = np.zeros(n, dtype=np.int64)
        self.in_use = np.zeros(n, dtype=np.int64)
        self.next_need = np.full(n, _NEVER, dtype=np.int64)
        self.last_used = np.zeros(n, dtype=np.int64)
        self.unverified = np.zeros(n, dtype=bool)  # adopted from an earlier run, not yet checked
        self.pending: dict[int, deque[list[int]]] = {}
        self.heap: list[tuple[int, int]] = []
        self.pins: dict[int, int] = {}
        self.seq = 0  # ids recorded by prefetch so far (positions in the need sequence)
        self.consumed = 0  # ids released so far: the reading position in that sequence
        self.horizon = 0  # ids of two prefetch calls: how far ahead a prefetch may evict live shards
        self.tick = 0
        self.resident = 0  # bytes of every shard whose status is not _ABSENT (loads reserve)
        self.peak = 0
        self.counters = self.zero_counters()
        self.threads: list[threading.Thread] = []
        self.pool_loads = 0  # loads a shared PrefetchPool thread is running for this runtime
        self.closed = False
        self._adopt_leftovers()

    @staticmethod
    def zero_counters() -> dict[str, float]:
        return {"bytes_downloaded": 0, "shards_downloaded": 0, "shards_reused": 0, "cache_repairs": 0,
                "evictions": 0, "samples_read": 0, "wait_seconds": 0.0}

    def _adopt_leftovers(self) -> None:
        """Count shards already complete in the cache (an earlier run) as resident, unpinned.

        Only their sizes are looked at here; their contents are verified on first use."""
        try:
            names = {e.name: e.stat().st_size for e in os.scandir(self.store.local) if e.is_file()}
        except FileNotFoundError:
            return
        for s, reader in enumerate(self.readers):
            if all(names.get(raw.basename) == raw.bytes for raw, _ in reader.file_pairs):
                self.status[s] = _READY
                self.unverified[s] = True
                self.resident += int(self.size[s])
        self.peak = self.resident

    # -- reading ---------------------------------------------------------------------------------
    def get(self, ids: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        shards, offsets = self.store.index.locate(ids)
        out: list[Any] = [None] * ids.size
        if not ids.size:
            return out
        order = np.argsort(shards, kind="stable")
        uniq, first, counts = np.unique(shards[order], return_index=True, return_counts=True)
        for k in np.argsort(order[first]).tolist():  # shards in order of first appearance
            s = int(uniq[k])
            positions = order[first[k]:first[k] + counts[k]]
            self._acquire(s)
            try:
                reader = self.readers[s]
                for p, o in zip(positions.tolist(), offsets[positions].tolist()):
                    try:
                        out[p] = reader.get_item(o)
                    except Exception as e:
                        raise DatasetError(
                            f"sample {int(ids[p])} (offset {o} of shard {self.store.entries[s].name} in "
                            f"{self.store.local}) cannot be read: {type(e).__name__}: {e}") from e
            finally:
                self._unuse(s)
        with self.cond:
            self.counters["samples_read"] += int(ids.size)
        return out

    def _acquire(self, s: int) -> None:
        """Make shard s local and pinned for reading by this thread (in_use + 1)."""
        waited = 0.0
        with self.cond:
            self.in_use[s] += 1
            self.tick += 1
            self.last_used[s] = self.tick
            while self.status[s] == _LOADING:
                t0 = time.perf_counter()
                self.cond.wait()
                waited += time.perf_counter() - t0
            if self.status[s] == _READY and s in self.pins:
                self.counters["wait_seconds"] += waited
                return
            if self.status[s] == _ABSENT:
                self._make_room(int(self.size[s]), floor=None)
                self._reserve(s)
            self.status[s] = _LOADING
        t0 = time.perf_counter()
        try:
            self._load(s)
        except BaseException:
            with self.cond:
                self.in_use[s] -= 1
            raise
        finally:
            with self.cond:
                self.counters["wait_seconds"] += waited + time.perf_counter() - t0

    def _unuse(self, s: int) -> None:
        with self.cond:
            self.in_use[s] -= 1
            if self.in_use[s] == 0 and self.refs[s] == 0:
                self._unpin(s)
            self.cond.notify_all()

    # -- needs -----------------------------------------------------------------------------------
    def prefetch(self, ids: np.ndarray | Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        shards = self.store.index.shard_of(ids)
        if not ids.size:
            return
        uniq, first, counts = np.unique(shards, return_index=True, return_counts=True)
        with self.cond:
            if self.closed:
                return
            base = self.seq
            self.seq += int(ids.size)
            self.horizon = 2 * int(ids.size)
            for s, f, c in zip(uniq.tolist(), first.tolist(), counts.tolist()):
                q = self.pending.setdefault(s, deque())
                if not q:
                    self.next_need[s] = base + f
                q.append([base + f, c])
                self.refs[s] += c
                if self.status[s] == _ABSENT or (self.status[s] == _READY and s not in self.pins):
                    heapq.heappush(self.heap, (int(self.next_need[s]), s))
            self._start_threads()
            self.cond.notify_all()

    def release(self, ids: np.ndarray | Sequence[int]) -> None:
        shards = self.store.index.shard_of(np.asarray(ids, dtype=np.int64).ravel())
        uniq, counts = np.unique(shards, return_counts=True)
        with self.cond:
            for s, c in zip(uniq.tolist(), counts.tolist()):
                q = self.pending.get(s)
                c = min(c, int(self.refs[s]))
                self.refs[s] -= c
                self.consumed += c
                while c and q:
                    take = min(c, q[0][1])
                    q[0][1] -= take
                    c -= take
                    if q[0][1] == 0:
                        q.popleft()
                self.next_need[s] = q[0][0] if q else _NEVER
                if self.refs[s] == 0 and self.in_use[s] == 0:
                    self._unpin(s)
            self.cond.notify_all()

    # -- prefetch threads ------------------------------------------------------------------------
    def _start_threads(self) -> None:
        if self.store.prefetch_pool is not None:
            self.store.prefetch_pool.attach(self)
            return
        while len(self.threads) < self.store.prefetch_threads:
            t = threading.Thread(target=self._worker, name=f"croupier-prefetch-{len(self.threads)}",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def _worker(self) -> None:
        while True:
            with self.cond:
                s = self._next_prefetch()
                while s is None and not self.closed:
                    self.cond.wait()
                    s = self._next_prefetch()
                if self.closed:
                    if s is not None:
                        self._abort_load(s)
                    return
            try:
                self._load(s)
            except Exception as e:  # surfaces again, from the reading thread, at get()
                log.warning("prefetch of shard %s failed: %s", _shard_name(self.readers[s]), e)

    def _next_prefetch(self) -> int | None:
        """Pop the next shard to prefetch and mark it loading; None when none may start now."""
        heap = self.heap
        while heap:
            need, s = heap[0]
            st = self.status[s]
            if self.refs[s] == 0 or st == _LOADING or (st == _READY and s in self.pins):
                heapq.heappop(heap)
                continue
            if need != self.next_need[s]:  # its first need moved on: requeue at the new position
                heapq.heapreplace(heap, (int(self.next_need[s]), s))
                continue
            if st == _ABSENT:
                floor = need if need < self.consumed + self.horizon else _LIVE
                if not self._make_room(int(self.size[s]), floor=floor):
                    return None
                self._reserve(s)
            heapq.heappop(heap)
            self.status[s] = _LOADING
            return s
        return None

    # -- cache accounting (callers hold self.cond) -----------------------------------------------
    def _reserve(self, s: int) -> None:
        self.resident += int(self.size[s])
        self.peak = max(self.peak, self.resident)

    def _make_room(self, need: int, floor: int | None) -> bool:
        """Evict until `need` more bytes fit the limit, highest eviction key first, only keys
        above `floor` (a prefetch: its own next need, or _LIVE for dead shards only). A get
        (`floor` None) evicts any shard not being read and goes over the limit when every
        resident shard is being read or loaded."""
        if self.limit is None:
            return True
        while self.resident + need > self.limit:
            cands = np.flatnonzero((self.status == _READY) & (self.in_use == 0))
            if not cands.size:
                return floor is None
            key = np.where(self.refs[cands] == 0, _NEVER - self.last_used[cands], self.next_need[cands])
            i = int(np.argmax(key))
            if floor is not None and key[i] <= floor:
                return False
            self._evict(int(cands[i]))
        return True

    def _evict(self, s: int) -> None:
        fd = self.pins.pop(s, None)
        if fd is None:
            fd = os.open(self._lock_path(s), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another process has it pinned: it stays on disk for them
        else:
            self.readers[s].evict()
        finally:
            os.close(fd)
        self.status[s] = _ABSENT
        self.resident -= int(self.size[s])
        self.counters["evictions"] += 1
        if self.refs[s] > 0:
            heapq.heappush(self.heap, (int(self.next_need[s]), s))

    def _unpin(self, s: int) -> None:
        fd = self.pins.pop(s, None)
        if fd is not None:
            os.close(fd)

    def _abort_load(self, s: int) -> None:
        self.status[s] = _ABSENT
        self.resident -= int(self.size[s])
        self.cond.notify_all()

    # -- files -----------------------------------------------------------------------------------
    def _lock_path(self, s: int) -> str:
        return str(self.lock_dir / (self.readers[s].file_pairs[0][0].basename + ".lock"))

    def _present(self, s: int) -> bool:
        local = self.store.local
        for raw, _ in self.readers[s].file_pairs:
            try:
                if os.stat(local / raw.basename).st_size != raw.bytes:
                    return False
            except FileNotFoundError:
                return False
        return True

    def _load(self, s: int) -> None:
        """Pin shard s (status _LOADING, set by the caller), downloading it if no process has."""
        try:
            fd, fetched = self._pin_local(s)
        except BaseException:
            with self.cond:
                self._abort_load(s)
            raise
        with self.cond:
            self.status[s] = _READY
            self.pins[s] = fd
            if fetched:
                self.counters["bytes_downloaded"] += fetched
                self.counters["shards_downloaded"] += 1
            else:
                self.counters["shards_reused"] += 1
            if self.refs[s] == 0 and self.in_use[s] == 0:
                self._unpin(s)
            self.cond.notify_all()

    def _pin_local(self, s: int) -> tuple[int, int]:
        """Hold shard s's lock shared with its files complete; returns (fd, bytes fetched)."""
        fd = os.open(self._lock_path(s), os.O_RDWR | os.O_CREAT, 0o644)
        fetched = 0
        deadline = time.monotonic() + self.store.download_timeout
        try:
            while True:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._present(s) and (not self.unverified[s] or self._verify_adopted(s) is None):
                    return fd, fetched
                fcntl.flock(fd, fcntl.LOCK_UN)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # another process is fetching or checking it
                    if time.monotonic() > deadline:
                        raise DatasetError(
                            f"shard {_shard_name(self.readers[s])} in {self.store.local} is incomplete "
                            f"but another process has held its lock for {self.store.download_timeout:.0f}s "
                            f"(were its files deleted while in use?)") from None
                    time.sleep(_LOCK_RETRY_S)
                    continue
                try:
                    fault = "absent" if not self._present(s) else \
                        self._verify_adopted(s) if self.unverified[s] else None
                    if fault is not None:
                        if fault != "absent":
                            log.warning("cached shard %s in %s is corrupt (%s): fetching it again",
                                        self.store.entries[s].name, self.store.local, fault)
                            with self.cond:
                                self.counters["cache_repairs"] += 1
                        self._download(s)
                        self.unverified[s] = False
                        fetched += int(self.store._fetch_bytes[s])
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise

    def _verify_adopted(self, s: int) -> str | None:
        """Check an adopted shard's files against the index (hash, then MDS header); None if good.

        A good shard is marked verified, so each process reads it once."""
        entry = self.store.entries[s]
        local = self.store.local
        for raw, _ in self.readers[s].file_pairs:
            algo = self.store.raw_hash_algorithm if raw.hashes else None
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
        """Fetch, verify and decompress shard s (caller holds its lock exclusively)."""
        reader = self.readers[s]
        reader.evict()  # partial or stale files from an interrupted run
        try:
            self.stream.prepare_shard(reader)
        except FileNotFoundError as e:
            reader.evict()
            raise DatasetError(f"shard file {_shard_name(reader)} is missing from {self.store.remote}: {e}") from e
        except ValueError as e:
            bad = self._hash_failure(reader) if "Checksum failure" in str(e) else None
            reader.evict()
            raise DatasetError(bad or f"cannot prepare shard {_shard_name(reader)} from "
                                      f"{self.store.remote}: {e}") from e
        except Exception as e:
            reader.evict()
            raise DatasetError(f"cannot fetch shard {_shard_name(reader)} from {self.store.remote}: {e}") from e
        for raw, _ in reader.file_pairs:  # catches corruption in datasets written without hashes
            size = os.stat(self.store.local / raw.basename).st_size
            if size != raw.bytes:
                reader.evict()
                raise DatasetError(f"shard file {raw.basename} from {self.store.remote} is corrupt: "
                                   f"{size} bytes, index.json says {raw.bytes}")

    def _hash_failure(self, reader: Any) -> str | None:
        from streaming.base.hashing import get_hash

        algo = self.store.hash_algorithm
        for raw, zip_info in reader.file_pairs:
            info = zip_info or raw
            path = self.store.local / info.basename
            if not path.exists() or algo is None:
                continue
            actual = get_hash(algo, path.read_bytes())
            if actual != info.hashes.get(algo):
                return (f"shard file {info.basename} from {self.store.remote} is corrupt: "
                        f"{algo} expected {info.hashes.get(algo)}, got {actual}")
        return None

    # -- lifecycle -------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        with self.cond:
            return dict(self.counters, cache_bytes=self.resident, peak_cache_bytes=self.peak,
                        pinned_shards=len(self.pins), pending_ids=int(self.refs.sum()))

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.store.prefetch_pool is not None:
            self.store.prefetch_pool.detach(self)
            with self.cond:
                self.cond.wait_for(lambda: self.pool_loads == 0)
        for t in self.threads:
            t.join()
        with self.cond:
            for s in list(self.pins):
                self._unpin(s)

    def forget(self) -> None:
        """In a forked child: close this process's copies of the parent's descriptors only."""
        for fd in self.pins.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.pins = {}


class PrefetchPool:
    """Download threads shared by several stores of one process (a mixture's sources), so a
    rank holds `threads` prefetch threads however many sources it reads. Each thread takes the
    next shard any attached store wants (stores in turn), under that store's own rules
    (need order, cache limit), and loads it; with nothing to do it sleeps until a store asks
    again (or a short timeout, for room freed by reads)."""

    def __init__(self, threads: int = 4) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"prefetch pool threads must be an integer >= 1, got {threads!r}")
        self.size = threads
        self._cond = threading.Condition()
        self._runtimes: list[_Runtime] = []
        self._threads: list[threading.Thread] = []
        self._turn = 0
        self._wanted = False
        self._closed = False

    def attach(self, rt: "_Runtime") -> None:
        """A store has shards to prefetch (idempotent); starts the threads on first use."""
        with self._cond:
            if rt not in self._runtimes:
                self._runtimes.append(rt)
            while len(self._threads) < self.size and not self._closed:
                t = threading.Thread(target=self._worker, name=f"croupier-prefetch-pool-{len(self._threads)}",
                                     daemon=True)
                self._threads.append(t)
                t.start()
            self._wanted = True
            self._cond.notify_all()

    def detach(self, rt: "_Runtime") -> None:
        with self._cond:
            if rt in self._runtimes:
                self._runtimes.remove(rt)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _take(self) -> tuple["_Runtime", int] | None:
        with self._cond:
            rts = list(self._runtimes)
            self._turn += 1
        for i in range(len(rts)):
            rt = rts[(self._turn + i) % len(rts)]
            with rt.cond:
                if rt.closed:
                    continue
                s = rt._next_prefetch()
                if s is not None:
                    rt.pool_loads += 1
                    return rt, s
        return None

    def _worker(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
            job = self._take()
            if job is None:
                with self._cond:
                    if not self._wanted and not self._closed:
                        self._cond.wait(0.05)
                    self._wanted = False
                continue
            rt, s = job
            try:
                rt._load(s)
            except Exception as e:  # surfaces again, from the reading thread, at get()
                log.warning("prefetch of shard %s failed: %s", _shard_name(rt.readers[s]), e)
            finally:
                with rt.cond:
                    rt.pool_loads -= 1
                    rt.cond.notify_all()


# -- helpers ----------------------------------------------------------------------------------------
def _fetch_index(remote: str, cache_root: Path, timeout: float) -> bytes:
    """The bytes of the remote's index.json (always fetched: a cached copy may be stale)."""
    from streaming.base.storage import CloudDownloader

    incoming = cache_root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    tmp = incoming / f"index.{os.getpid()}.{uuid.uuid4().hex}.json"
    source = os.path.join(remote, INDEX_BASENAME)
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
    """Write the dataset's index.json into its cache dir unless an identical copy is there."""
    try:
        if path.read_bytes() == data:
            return
    except FileNotFoundError:
        pass
    write_bytes_atomic(path, data)


def _readers(index: dict, local: str, allow_unsafe_types: bool) -> list[Any]:
    from streaming.base.format import reader_from_json

    readers = []
    for info in index["shards"]:
        reader = reader_from_json(local, None, info)
        reader.validate(allow_unsafe_types)
        readers.append(reader)
    if not readers:
        raise ValueError("it lists no shards")
    return readers


def _shard_name(reader: Any) -> str:
    raw, zip_info = reader.file_pairs[0]
    return (zip_info or raw).basename
