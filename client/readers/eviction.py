"""Which shard a shard cache fetches next and which it evicts: Belady's rule within what it knows.

A reader records the ids it will read (`record`, in the order it will read them) and
releases them once read (`release`). From that, each shard has a reference count (pending
reads) and the position of its next need in the reading sequence. The policy answers:

- what to fetch next: the shard with the earliest next need (`next_wanted`);
- what to evict: a shard no pending read needs (least recently used first), else the one
  needed last (`victim`). A prefetch may evict a still-needed shard only for a shard needed
  within the next two recorded slices, and only one needed later than it (`prefetch_floor`):
  evicting live shards far ahead of need re-downloads them.

Pure bookkeeping over numpy arrays: no I/O, no threads, no locks (the cache calls it under
its own lock).
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable

import numpy as np

NEVER = 1 << 62
"""The next need of a shard that no pending read needs."""
LIVE = 1 << 61
"""Eviction keys: a needed shard's key is its next need (below LIVE); an unneeded one's is above."""


class NeedOrder:
    """The reading sequence's needs per shard and the eviction order they imply (see the
    module docstring). Not thread-safe: the caller serializes every call."""

    def __init__(self, num_shards: int) -> None:
        n = int(num_shards)
        self.refs = np.zeros(n, dtype=np.int64)  # pending reads per shard
        self.next_need = np.full(n, NEVER, dtype=np.int64)  # position of each shard's next pending read
        self.last_used = np.zeros(n, dtype=np.int64)
        self._pending: dict[int, deque[list[int]]] = {}  # shard -> [position, count] of its pending reads
        self._heap: list[tuple[int, int]] = []  # (next need, shard) of shards to fetch
        self._seq = 0  # ids recorded so far (positions in the need sequence)
        self._consumed = 0  # ids released so far: the reading position in that sequence
        self._horizon = 0  # ids of two recorded slices: how far ahead a prefetch may evict needed shards
        self._tick = 0

    # -- the reading sequence -------------------------------------------------------------------------
    def record(self, shards: np.ndarray) -> np.ndarray:
        """Records one slice's future reads (the shard of each id, in reading order); returns the
        distinct shards it names."""
        uniq, first, counts = np.unique(shards, return_index=True, return_counts=True)
        base = self._seq
        self._seq += int(shards.size)
        self._horizon = 2 * int(shards.size)
        for s, f, c in zip(uniq.tolist(), first.tolist(), counts.tolist()):
            q = self._pending.setdefault(s, deque())
            if not q:
                self.next_need[s] = base + f
            q.append([base + f, c])
            self.refs[s] += c
        return uniq

    def release(self, shards: np.ndarray) -> list[int]:
        """The reads of these ids' shards are done; returns the shards no pending read needs now."""
        uniq, counts = np.unique(shards, return_counts=True)
        unneeded = []
        for s, c in zip(uniq.tolist(), counts.tolist()):
            q = self._pending.get(s)
            c = min(c, int(self.refs[s]))
            self.refs[s] -= c
            self._consumed += c
            while c and q:
                take = min(c, q[0][1])
                q[0][1] -= take
                c -= take
                if q[0][1] == 0:
                    q.popleft()
            self.next_need[s] = q[0][0] if q else NEVER
            if self.refs[s] == 0:
                unneeded.append(s)
        return unneeded

    def touch(self, s: int) -> None:
        """Shard s is being read (recency, for shards no pending read needs)."""
        self._tick += 1
        self.last_used[s] = self._tick

    def needed(self, s: int) -> bool:
        return bool(self.refs[s] > 0)

    def pending_ids(self) -> int:
        return int(self.refs.sum())

    # -- fetching ------------------------------------------------------------------------------------
    def want(self, s: int) -> None:
        """Shard s is to be fetched at its next need (it is absent, or resident but unpinned)."""
        heapq.heappush(self._heap, (int(self.next_need[s]), s))

    def next_wanted(self, skip: Callable[[int], bool]) -> tuple[int, int] | None:
        """(next need, shard) of the wanted shard needed first, or None; drops shards no read
        needs any more and those `skip` says need no fetch (loading, or resident and pinned).
        It stays wanted until `taken()`."""
        heap = self._heap
        while heap:
            need, s = heap[0]
            if self.refs[s] == 0 or skip(s):
                heapq.heappop(heap)
                continue
            if need != self.next_need[s]:  # its first need moved on: requeue at the new position
                heapq.heapreplace(heap, (int(self.next_need[s]), s))
                continue
            return need, s
        return None

    def taken(self) -> None:
        """The shard `next_wanted` returned is being fetched."""
        heapq.heappop(self._heap)

    # -- eviction ------------------------------------------------------------------------------------
    def prefetch_floor(self, need: int) -> int:
        """The eviction keys a prefetch for a shard first needed at `need` may evict above: its
        own need when that is within the next two slices, else only unneeded shards."""
        return need if need < self._consumed + self._horizon else LIVE

    def victim(self, candidates: np.ndarray, floor: int | None) -> int | None:
        """The candidate to evict first: unneeded ones (least recently used first), then the one
        needed last; None when its key is not above `floor` (None: any candidate goes)."""
        key = np.where(self.refs[candidates] == 0, NEVER - self.last_used[candidates], self.next_need[candidates])
        i = int(np.argmax(key))
        if floor is not None and key[i] <= floor:
            return None
        return int(candidates[i])


__all__ = ["LIVE", "NEVER", "NeedOrder"]
