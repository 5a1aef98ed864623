"""The node's one shard cache, owned by its `croupier agent`.

The agent sees every slice it forwards to a local consumer before the consumer does, so it
knows the union of the node's lookahead, in step order: it records each slice's ids as a
need (`prefetch_slices`) and background threads download the shards in order of first need,
one download per shard per node. A lane's needs are released when the server confirms the
lane's acknowledgement (`release_lane`), so eviction (under `cache_limit`) follows Belady's
rule over what the node will read: shards no local consumer still needs go first, then the
one needed last (`croupier.client.readers.eviction` implements the rule; this is one
`ShardCache` per node instead of one per process).

Consumers never receive sample bytes from the agent: before reading a step they ask it to
make the step's shards present (`ensure`), then read the files from the shared cache
directory under the store's per-shard shared locks, which the agent's eviction respects.
The dataset's index.json is fetched once, by the agent, and read by consumers from the cache.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.format.mds_index import INDEX_BASENAME
from croupier.proto import slice_ids


class NodeCache:
    """One node's shard cache (see the module docstring); thread-safe."""

    def __init__(self, cache_dir: str | Path, cache_limit: int | None = None, prefetch_threads: int = 4) -> None:
        self.cache_dir = Path(cache_dir)
        self.cache_limit = cache_limit
        self.prefetch_threads = prefetch_threads
        self._remote: str | None = None
        self._fingerprint: str | None = None
        self._store: Any = None
        self._lock = threading.Lock()  # counters and configuration: never held across I/O
        self._open_lock = threading.Lock()  # opening the store (imports, index fetch: seconds)
        self._lanes: dict[tuple[int, int], deque[tuple[int, np.ndarray]]] = {}  # (lane, rank) -> needs
        self.hits = 0
        self.misses = 0

    def configure(self, remote: str, fingerprint: str | None) -> None:
        """The dataset the node reads (from the job a rank joined); the store opens on first use."""
        with self._lock:
            if self._remote is None:
                self._remote, self._fingerprint = remote, fingerprint
            elif (remote, fingerprint) != (self._remote, self._fingerprint):
                raise ConfigError(f"this agent's cache serves dataset {self._remote} ({self._fingerprint}); "
                                  f"a rank joined a job reading {remote} ({fingerprint})")

    @property
    def is_open(self) -> bool:
        """Whether the store is open (index.json fetched)."""
        return self._store is not None

    def store(self) -> Any:
        """The node's ShardCache, opened (index.json fetched, reader imported) on first call.
        Call it off the agent's event loop: the first call takes seconds. The event loop only
        ever sees a store that is fully open (`_store` is set last)."""
        if self._store is not None:
            return self._store
        with self._open_lock:
            if self._store is None:
                with self._lock:
                    remote, fingerprint = self._remote, self._fingerprint
                if remote is None:
                    raise ConfigError("no rank has joined through this agent yet: the dataset is not known")
                from croupier.client.readers.shard_cache import ShardCache  # noqa: PLC0415 - streaming is heavy

                store = ShardCache(remote, self.cache_dir, fingerprint=fingerprint,
                                   cache_limit=self.cache_limit, prefetch_threads=self.prefetch_threads,
                                   share_index=True)
                store.open()  # imports the downloader here, not on the agent's loop
                self._store = store
            return self._store

    @property
    def local_dir(self) -> Path:
        """The directory holding the dataset's shards and index.json (opens the store)."""
        return Path(self.store().local)

    def index_path(self) -> Path:
        return self.local_dir / INDEX_BASENAME

    # -- needs -------------------------------------------------------------------------------------
    def prefetch_slices(self, lane: int, slices: Iterable[Any], rank: int = 0) -> None:
        """Records the ids of slices about to reach a local consumer as needs, in order. A lane
        carrying several ranks records each rank's needs apart (`rank`), so each is released
        when that rank has read them, not when the lane's slowest rank has."""
        store = self._store
        if store is None:
            return  # not open yet (it opens off the agent's loop): consumers' fetches still work
        for sl in slices:
            self.prefetch_ids(lane, int(sl.step), slice_ids(sl), rank)

    def prefetch_ids(self, lane: int, step: int, ids: np.ndarray, rank: int = 0) -> None:
        """Records one step's ids of a lane's rank as needs (no-op until the store is open)."""
        store = self._store
        if store is None or not ids.size:
            return
        self._lanes.setdefault((lane, rank), deque()).append((step, ids))
        store.prefetch(ids)

    def release_lane(self, lane: int, acked_step: int, rank: int = 0) -> None:
        """The lane's rank consumed every step before `acked_step`: its needs there are released."""
        q = self._lanes.get((lane, rank))
        if not q:
            return
        store = self.store()
        while q and q[0][0] < acked_step:
            store.release(q.popleft()[1])

    def forget_lane(self, lane: int) -> None:
        """A lane closed: whatever its ranks had not consumed is no longer needed."""
        for key in [k for k in self._lanes if k[0] == lane]:
            q = self._lanes.pop(key)
            if self._store is not None:
                for _, ids in q:
                    self._store.release(ids)

    def ensure(self, shards: np.ndarray) -> None:
        """Makes these shards present in the cache (downloading those that are not)."""
        store = self.store()
        for s in np.unique(np.asarray(shards, dtype=np.int64)).tolist():
            if not 0 <= s < store.num_shards:
                raise ConfigError(f"shard {s} is outside the dataset's {store.num_shards} shards")
            hit = store.is_resident(s)
            with self._lock:
                if hit:
                    self.hits += 1
                else:
                    self.misses += 1
            store.make_present(s)

    def stats(self) -> dict[str, float]:
        base: dict[str, float] = {"bytes_downloaded": 0, "shards_downloaded": 0, "cache_bytes": 0, "peak_cache_bytes": 0,
                "evictions": 0}
        if self._store is not None:
            base.update({k: v for k, v in self._store.stats().items() if k in base})
        base.update(hits=self.hits, misses=self.misses)
        return base

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


class MixNodeCache:
    """The node cache of a mixture job: one `NodeCache` per source, opened on first use.

    Global ids are split by source (`JobInfo.sources` offsets) into local ids; each source's
    cache keeps its own folder under the node's cache directory and an even share of the
    node's `cache_limit`. Consumers name the source in their fetches."""

    def __init__(self, cache_dir: str | Path, cache_limit: int | None, sources: list[Any],
                 prefetch_threads: int = 4) -> None:
        self.sources = list(sources)
        self._starts = np.array([s.offset for s in self.sources], dtype=np.int64)
        limit = None if cache_limit is None else max(1, int(cache_limit) // len(self.sources))
        self._caches = [NodeCache(cache_dir, limit, prefetch_threads) for _ in self.sources]
        for cache, src in zip(self._caches, self.sources):
            cache.configure(src.remote, src.fingerprint or None)

    @property
    def is_open(self) -> bool:
        """False: a mixture's sources open one by one, on the consumers' first fetches."""
        return False

    def matches(self, sources: list[Any]) -> bool:
        return [(s.name, s.remote, s.fingerprint, s.offset) for s in sources] == \
            [(s.name, s.remote, s.fingerprint, s.offset) for s in self.sources]

    def prefetch_slices(self, lane: int, slices: Iterable[Any], rank: int = 0) -> None:
        for sl in slices:
            ids = slice_ids(sl)
            if not ids.size:
                continue
            src = np.searchsorted(self._starts, ids, side="right") - 1
            for i in np.unique(src).tolist():
                self._caches[i].prefetch_ids(lane, int(sl.step), ids[src == i] - self._starts[i], rank)

    def release_lane(self, lane: int, acked_step: int, rank: int = 0) -> None:
        for cache in self._caches:
            if cache.is_open:
                cache.release_lane(lane, acked_step, rank)

    def forget_lane(self, lane: int) -> None:
        for cache in self._caches:
            cache.forget_lane(lane)

    def source(self, index: int) -> NodeCache:
        if not 0 <= index < len(self._caches):
            raise ConfigError(f"source {index} is outside the mixture's {len(self._caches)} sources")
        return self._caches[index]

    def stats(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for cache in self._caches:
            for k, v in cache.stats().items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        for cache in self._caches:
            cache.close()
