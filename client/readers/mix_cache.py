"""Reading a mixture job's samples: global ids routed to their source's shards.

A mixture job's global id g belongs to the source whose [offset, offset + size) holds it
(JobInfo.sources, in file order); its local id is g - offset. `MixStore` splits each request
by source, asks that source's `ShardCache` for the local ids and puts the samples back in
the server's order. A source's store (its index.json, cache folder, readers and prefetch
threads) is opened the first time one of its ids is read, so a rank that never draws from a
source holds nothing for it. Each source is checked against its own fingerprint.

cache_limit: the byte limit is split evenly over the sources (each store must still hold
its largest shard); None = no limit. The sources' stores share one pool of prefetch threads
(`prefetch_pool.PrefetchPool`), so threads do not grow with the number of sources.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from croupier.errors import ConfigError


class MixStore:
    """get / prefetch / release / stats / close, as `ShardCache`, over a mixture's sources."""

    def __init__(self, sources: Sequence[Any], open_source: Callable[[int, Any, int | None], Any],
                 cache_limit: int | None = None, on_close: Callable[[], None] | None = None) -> None:
        if not sources:
            raise ConfigError("a mixture job lists no sources")
        self.sources = list(sources)
        for s in self.sources:
            if not s.remote:
                raise ConfigError(f"mixture source {s.name!r} names no remote: it is synthetic (no shards) or the "
                                  "server was started without one")
        self._starts = np.array([s.offset for s in self.sources], dtype=np.int64)
        self._ends = self._starts + np.array([s.size for s in self.sources], dtype=np.int64)
        self._open_source = open_source
        self._limit = None if cache_limit is None else max(1, int(cache_limit) // len(self.sources))
        self._stores: dict[int, Any] = {}
        self._on_close = on_close
        self._prefetching = False

    def source_of(self, ids: np.ndarray) -> np.ndarray:
        """Source index of each global id; refuses an id outside every source."""
        src = np.searchsorted(self._starts, ids, side="right") - 1
        bad = (src < 0) | (ids >= self._ends[np.maximum(src, 0)])
        if bad.any():
            raise ConfigError(f"global id {int(ids[bad][0])} lies in no source of the mixture")
        return src

    def _store(self, i: int) -> Any:
        st = self._stores.get(i)
        if st is None:
            st = self._stores[i] = self._open_source(i, self.sources[i], self._limit)
            if self._prefetching:
                st.start_prefetch()
        return st

    def _split(self, ids: np.ndarray | Sequence[int]):
        ids = np.asarray(ids, dtype=np.int64)
        src = self.source_of(ids)
        for i in np.unique(src):
            where = np.flatnonzero(src == i)
            yield int(i), where, ids[where] - self._starts[i]

    def get(self, ids: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(ids)
        for i, where, local in self._split(ids):
            for w, sample in zip(where, self._store(i).get(local)):
                out[w] = sample
        return out  # type: ignore[return-value]

    def prefetch(self, ids: np.ndarray | Sequence[int]) -> None:
        for i, _, local in self._split(ids):
            self._store(i).prefetch(local)

    def start_prefetch(self) -> None:
        """Ends the sources' `hold_prefetch` (`ShardCache`), for the open ones and those opened later."""
        if self._prefetching:
            return
        self._prefetching = True
        for st in self._stores.values():
            st.start_prefetch()

    def release(self, ids: np.ndarray | Sequence[int]) -> None:
        for i, _, local in self._split(ids):
            if i in self._stores:
                self._stores[i].release(local)

    def stats(self) -> dict[str, float]:
        """The sources' counters summed (peaks too: an upper bound), plus `sources_open`."""
        total: dict[str, float] = {}
        for st in self._stores.values():
            for k, v in st.stats().items():
                total[k] = total.get(k, 0) + v
        total["sources_open"] = len(self._stores)
        return total

    def close(self) -> None:
        for st in self._stores.values():
            st.close()
        self._stores.clear()
        if self._on_close is not None:
            self._on_close()
