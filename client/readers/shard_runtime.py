"""One shard cache in one process: which shards are here, which are pinned, who loads what.

`ShardCache` (`croupier.client.readers.shard_cache`) is what a reader holds and pickles; on
first use in each process it builds a `ShardRuntime`, holding everything that cannot cross
a fork: threads, the lock, descriptors of pinned shards, the downloader. The runtime ties
three parts together under one condition variable:

- `NeedOrder` (`eviction`): the recorded reading sequence, the fetch order and the eviction
  order (Belady's rule within what the reader recorded);
- `ShardFetcher` (`shard_fetch`): getting a shard's files present and checked, under the
  per-shard lock files (`shard_lock`) that several processes of a node share;
- here: each shard's state (absent, loading, ready), the bytes resident against the
  limit, the shards being read, the prefetch threads and the counters.

A prefetch evicts a still-needed shard only for a shard needed soon (see `eviction`);
otherwise it waits for `release(ids)` to free room. `get(ids)` never waits on the limit:
it evicts the least-soon-needed shard that is not being read, and goes over the limit when
every resident shard is being read or loaded. Downloads, checks and decoding run with the
condition variable released; deleting an evicted shard's files runs under it, so a shard's
state and its files stay in step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from croupier.client.readers.eviction import NeedOrder
from croupier.client.readers.shard_fetch import DatasetFiles, ShardFetcher, shard_name
from croupier.errors import DatasetError

log = logging.getLogger(__name__)

ABSENT, LOADING, READY = 0, 1, 2
"""A shard's state in this process's view of the cache."""


class IdTable(Protocol):
    """Global sample id -> (shard, offset in the shard) (`croupier.format.mds_index`)."""

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def shard_of(self, ids: np.ndarray) -> np.ndarray: ...


class Prefetcher(Protocol):
    """Download threads shared by several caches (`croupier.client.readers.prefetch_pool`)."""

    def attach(self, rt: ShardRuntime) -> None: ...

    def detach(self, rt: ShardRuntime) -> None: ...


def zero_counters() -> dict[str, float]:
    """The per-process counters of a cache that has done nothing yet."""
    return {"bytes_downloaded": 0, "shards_downloaded": 0, "shards_reused": 0, "cache_repairs": 0,
            "evictions": 0, "samples_read": 0, "wait_seconds": 0.0}


class ShardRuntime:
    """The state of one cache in one process (see the module docstring)."""

    def __init__(self, files: DatasetFiles, table: IdTable, cache_limit: int | None, prefetch_threads: int,
                 pool: Prefetcher | None, held: bool = False) -> None:
        self.pid = os.getpid()
        self.files = files
        self.table = table
        self.readers = files.readers
        self.size = files.disk_bytes
        self.limit = cache_limit
        self.prefetch_threads = prefetch_threads
        self.pool = pool
        self.fetcher = ShardFetcher(files)
        n = len(self.readers)
        self.needs = NeedOrder(n)
        self.cond = threading.Condition()
        self.status = np.zeros(n, dtype=np.int8)
        self.in_use = np.zeros(n, dtype=np.int64)  # reads of each shard in progress
        self.pins: dict[int, int] = {}  # shard -> its lock's descriptor, held shared
        self.resident = 0  # bytes of every shard whose status is not ABSENT (loads reserve)
        self.peak = 0
        self.counters = zero_counters()
        self.threads: list[threading.Thread] = []
        self.pool_loads = 0  # loads a shared pool thread is running for this runtime
        self.closed = False
        self.held = held  # needs are recorded, loads wait for `start_prefetch`
        adopted = self.fetcher.adopt_leftovers()
        self.status[adopted] = READY
        self.resident = int(self.size[adopted].sum())
        self.peak = self.resident

    # -- reading ---------------------------------------------------------------------------------
    def get(self, ids: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        shards, offsets = self.table.locate(ids)
        out: list[Any] = [None] * ids.size
        if not ids.size:
            return out
        order = np.argsort(shards, kind="stable")
        uniq, first, counts = np.unique(shards[order], return_index=True, return_counts=True)
        for k in np.argsort(order[first]).tolist():  # shards in order of first appearance
            s = int(uniq[k])
            positions = order[first[k]:first[k] + counts[k]]
            self.acquire(s)
            try:
                reader = self.readers[s]
                for p, o in zip(positions.tolist(), offsets[positions].tolist()):
                    try:
                        out[p] = reader.get_item(o)
                    except Exception as e:
                        raise DatasetError(
                            f"sample {int(ids[p])} (offset {o} of shard {self.files.entries[s].name} in "
                            f"{self.files.local}) cannot be read: {type(e).__name__}: {e}") from e
            finally:
                self.unuse(s)
        with self.cond:
            self.counters["samples_read"] += int(ids.size)
        return out

    def acquire(self, s: int) -> None:
        """Makes shard s local and pinned for reading by this thread (until `unuse(s)`)."""
        waited = 0.0
        with self.cond:
            self.in_use[s] += 1
            self.needs.touch(s)
            while self.status[s] == LOADING:
                t0 = time.perf_counter()
                self.cond.wait()
                waited += time.perf_counter() - t0
            if self.status[s] == READY and s in self.pins:
                self.counters["wait_seconds"] += waited
                return
            if self.status[s] == ABSENT:
                self._make_room(int(self.size[s]), floor=None)
                self._reserve(s)
            self.status[s] = LOADING
        t0 = time.perf_counter()
        try:
            self.load(s)
        except BaseException:
            with self.cond:
                self.in_use[s] -= 1
            raise
        finally:
            with self.cond:
                self.counters["wait_seconds"] += waited + time.perf_counter() - t0

    def unuse(self, s: int) -> None:
        """This thread is done reading shard s."""
        with self.cond:
            self.in_use[s] -= 1
            if self.in_use[s] == 0 and not self.needs.needed(s):
                self._unpin(s)
            self.cond.notify_all()

    def resident_now(self, s: int) -> bool:
        """Whether shard s is in the cache as this process sees it (not loading)."""
        with self.cond:
            return bool(self.status[s] == READY)

    # -- needs -----------------------------------------------------------------------------------
    def prefetch(self, ids: np.ndarray | Sequence[int]) -> None:
        ids = np.asarray(ids, dtype=np.int64).ravel()
        shards = self.table.shard_of(ids)
        if not ids.size:
            return
        with self.cond:
            if self.closed:
                return
            for s in self.needs.record(shards).tolist():
                if self.status[s] == ABSENT or (self.status[s] == READY and s not in self.pins):
                    self.needs.want(s)
            if not self.held:
                self._start_threads()
            self.cond.notify_all()

    def start_prefetch(self) -> None:
        """Loads of recorded needs may start (they were held, see `ShardCache`)."""
        with self.cond:
            if self.closed or not self.held:
                return
            self.held = False
            if self.needs.next_wanted(self._no_fetch) is not None:  # else the next prefetch starts them
                self._start_threads()
                self.cond.notify_all()

    def release(self, ids: np.ndarray | Sequence[int]) -> None:
        shards = self.table.shard_of(np.asarray(ids, dtype=np.int64).ravel())
        with self.cond:
            for s in self.needs.release(shards):
                if self.in_use[s] == 0:
                    self._unpin(s)
            self.cond.notify_all()

    # -- prefetch threads ------------------------------------------------------------------------
    def _start_threads(self) -> None:
        if self.pool is not None:
            self.pool.attach(self)
            return
        while len(self.threads) < self.prefetch_threads:
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
            assert s is not None
            self.prefetch_load(s)

    def claim_prefetch(self) -> int | None:
        """For a shared pool's thread: the next shard to prefetch, marked loading (the thread
        then calls `prefetch_load(s)` and `pool_load_done()`), or None."""
        with self.cond:
            if self.closed:
                return None
            s = self._next_prefetch()
            if s is not None:
                self.pool_loads += 1
            return s

    def pool_load_done(self) -> None:
        with self.cond:
            self.pool_loads -= 1
            self.cond.notify_all()

    def prefetch_load(self, s: int) -> None:
        """Loads shard s for a prefetch; a failure is logged here and raised again, from the
        reading thread, at `get()`."""
        try:
            self.load(s)
        except Exception as e:
            log.warning("prefetch of shard %s failed: %s", shard_name(self.readers[s]), e)

    def _no_fetch(self, s: int) -> bool:
        """Whether a wanted shard s needs no fetch now (loading, or resident and pinned)."""
        return bool(self.status[s] == LOADING or (self.status[s] == READY and s in self.pins))

    def _next_prefetch(self) -> int | None:
        """Takes the next shard to prefetch and marks it loading; None when none may start now."""
        got = self.needs.next_wanted(self._no_fetch)
        if got is None:
            return None
        need, s = got
        if self.status[s] == ABSENT:
            if not self._make_room(int(self.size[s]), floor=self.needs.prefetch_floor(need)):
                return None
            self._reserve(s)
        self.needs.taken()
        self.status[s] = LOADING
        return s

    # -- cache accounting (callers hold self.cond) -----------------------------------------------
    def _reserve(self, s: int) -> None:
        self.resident += int(self.size[s])
        self.peak = max(self.peak, self.resident)

    def _make_room(self, need: int, floor: int | None) -> bool:
        """Evicts until `need` more bytes fit the limit, in the policy's order, only shards
        whose eviction key is above `floor` (a prefetch's). A get (`floor` None) evicts any
        shard not being read and goes over the limit when every resident shard is being read
        or loaded."""
        if self.limit is None:
            return True
        while self.resident + need > self.limit:
            cands = np.flatnonzero((self.status == READY) & (self.in_use == 0))
            if not cands.size:
                return floor is None
            s = self.needs.victim(cands, floor)
            if s is None:
                return False
            self._evict(s)
        return True

    def _evict(self, s: int) -> None:
        self.fetcher.evict(s, self.pins.pop(s, None))
        self.status[s] = ABSENT
        self.resident -= int(self.size[s])
        self.counters["evictions"] += 1
        if self.needs.needed(s):
            self.needs.want(s)

    def _unpin(self, s: int) -> None:
        fd = self.pins.pop(s, None)
        if fd is not None:
            os.close(fd)

    def _abort_load(self, s: int) -> None:
        self.status[s] = ABSENT
        self.resident -= int(self.size[s])
        self.cond.notify_all()

    # -- files -----------------------------------------------------------------------------------
    def load(self, s: int) -> None:
        """Pins shard s (status LOADING, set by the caller), downloading it if no process has."""
        try:
            fd, fetched = self.fetcher.pin(s, self._count_repair)
        except BaseException:
            with self.cond:
                self._abort_load(s)
            raise
        with self.cond:
            self.status[s] = READY
            self.pins[s] = fd
            if fetched:
                self.counters["bytes_downloaded"] += fetched
                self.counters["shards_downloaded"] += 1
            else:
                self.counters["shards_reused"] += 1
            if not self.needs.needed(s) and self.in_use[s] == 0:
                self._unpin(s)
            self.cond.notify_all()

    def _count_repair(self) -> None:
        with self.cond:
            self.counters["cache_repairs"] += 1

    # -- lifecycle -------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        with self.cond:
            return dict(self.counters, cache_bytes=self.resident, peak_cache_bytes=self.peak,
                        pinned_shards=len(self.pins), pending_ids=self.needs.pending_ids())

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        if self.pool is not None:
            self.pool.detach(self)
            with self.cond:
                self.cond.wait_for(lambda: self.pool_loads == 0)
        for t in self.threads:
            t.join()
        with self.cond:
            for s in list(self.pins):
                self._unpin(s)

    def forget(self) -> None:
        """In a forked child: closes this process's copies of the parent's descriptors only."""
        for fd in self.pins.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.pins = {}


__all__ = ["ABSENT", "LOADING", "READY", "ShardRuntime", "zero_counters"]
