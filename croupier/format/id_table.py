"""Global sample id -> (shard, offset in shard), from the per-shard sample counts of an MDS index.

An MDS dataset numbers its samples shard after shard: shard `s` holds the ids
`[starts[s], starts[s] + samples[s])`. The table is two int64 arrays, and a lookup is one
`np.searchsorted` over the cumulative counts for a whole batch of ids at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from croupier.errors import ConfigError, CroupierError


class SampleIdError(CroupierError, IndexError):
    """A requested sample id lies outside the dataset."""


class ShardTable:
    """Where each global sample id lives.

    samples: per-shard sample counts in shard order (empty shards are allowed).
    """

    def __init__(self, samples: Sequence[int] | np.ndarray) -> None:
        counts = np.asarray(samples, dtype=np.int64)
        if counts.ndim != 1 or counts.size == 0:
            raise ConfigError(f"a shard table needs at least one shard, got {counts.size}")
        if (counts < 0).any():
            s = int(np.flatnonzero(counts < 0)[0])
            raise ConfigError(f"shard {s} has a negative sample count {int(counts[s])}")
        self.samples = counts
        self.ends = np.cumsum(counts)
        self.starts = self.ends - counts

    @property
    def num_shards(self) -> int:
        return int(self.samples.size)

    @property
    def num_samples(self) -> int:
        return int(self.ends[-1])

    def shard_of(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        """Shard of each id (vectorized). Raises SampleIdError for ids outside the dataset."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size:
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_samples:
                bad = lo if lo < 0 else hi
                raise SampleIdError(f"sample id {bad} is outside the dataset [0, {self.num_samples})")
        return np.searchsorted(self.ends, ids, side="right")

    def locate(self, ids: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset within that shard) of each id, as two int64 arrays."""
        ids = np.asarray(ids, dtype=np.int64)
        shards = self.shard_of(ids)
        return shards, ids - self.starts[shards]
