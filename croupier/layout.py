"""Which samples belong to which cluster: the sampler's only view of a dataset.

A layout is CSR-shaped. Cluster `c` owns the positions `[offsets[c], offsets[c+1])`; the
global sample id at position `p` is `members[p]`, or `p` itself when `members` is None
(a cluster-major dataset whose clusters are contiguous id ranges). Memory is O(clusters)
for cluster-major data and one int64 per sample otherwise (memory-mapped when it comes
from a sidecar).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from croupier.errors import ConfigError, ReportRefused

GroupOf = Union[np.ndarray, Callable[[np.ndarray], np.ndarray]]
"""id -> group: a dense array indexed by id, or a function of an id array."""


@dataclass(frozen=True, eq=False)
class ClusterLayout:
    """Cluster membership of a dataset (or of a selected subset of it).

    offsets: int64 array of length K+1, offsets[0] == 0, non-decreasing.
    members: None, or an int64 array of length offsets[-1] holding global sample ids.
    num_samples: size of the id space (ids lie in [0, num_samples)).
    fingerprint: a string that changes whenever membership changes; sampler states and
        checkpoints are bound to it.
    block_size: the in-cluster read block, in samples. 1 (the default) orders each pass of a
        cluster uniformly at random. B > 1 splits each cluster into blocks of B consecutive
        positions from its start (the last one shorter) and orders a pass block by block:
        blocks in a keyed random order, samples in a keyed random order inside each block.
        A cluster-major dataset whose shards each hold B samples of one cluster then reads
        one shard at a time per cluster, which keeps the readers' working set and download
        amplification small (docs/reading.md).
    """

    offsets: np.ndarray
    members: np.ndarray | None
    num_samples: int
    fingerprint: str
    block_size: int = 1
    sizes: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        offsets = np.asarray(self.offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 2:
            raise ConfigError(f"a layout needs at least one cluster, got {max(len(offsets) - 1, 0)}")
        if offsets[0] != 0:
            raise ConfigError(f"layout offsets must start at 0, got {int(offsets[0])}")
        sizes = np.diff(offsets)
        if (sizes <= 0).any():
            bad = np.flatnonzero(sizes <= 0)
            raise ConfigError(
                f"every cluster must hold at least one sample; cluster {int(bad[0])} has size "
                f"{int(sizes[bad[0]])} ({len(bad)} empty clusters in all)"
            )
        if self.members is not None and len(self.members) != offsets[-1]:
            raise ConfigError(
                f"layout members has {len(self.members)} entries but offsets cover {int(offsets[-1])}"
            )
        if self.members is None and offsets[-1] > self.num_samples:
            raise ConfigError(f"layout covers {int(offsets[-1])} positions but the dataset has {self.num_samples} samples")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, (int, np.integer)) \
                or self.block_size < 1:
            raise ConfigError(f"block size must be an integer >= 1, got {self.block_size!r}")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "sizes", sizes)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_sizes(cls, sizes: Sequence[int] | np.ndarray, block_size: int = 1) -> ClusterLayout:
        """Synthetic clusters of the given sizes with contiguous ids (cluster 0 first)."""
        sizes = np.asarray(sizes, dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0:
            raise ConfigError("cluster sizes must be a non-empty list of integers")
        if (sizes <= 0).any():
            i = int(np.flatnonzero(sizes <= 0)[0])
            raise ConfigError(f"cluster sizes must be >= 1; cluster {i} has size {int(sizes[i])}")
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        digest = hashlib.sha256(b"croupier.sizes.v1" + sizes.astype("<i8").tobytes()).hexdigest()[:16]
        return cls(offsets=offsets, members=None, num_samples=int(offsets[-1]), fingerprint=f"sizes:{digest}",
                   block_size=block_size)

    @classmethod
    def from_assignments(cls, assignments: np.ndarray, num_clusters: int | None = None,
                         fingerprint: str | None = None) -> ClusterLayout:
        """Layout from a per-sample cluster label array (label -1 = not in any cluster).

        Members of each cluster are listed in increasing id order. Clusters with no member
        are refused, since a cluster-balanced policy would have nothing to draw from them.
        """
        labels = np.asarray(assignments)
        if labels.ndim != 1 or len(labels) == 0:
            raise ConfigError("assignments must be a non-empty 1-D array")
        k = int(labels.max()) + 1 if num_clusters is None else int(num_clusters)
        keep = np.flatnonzero(labels >= 0)
        order = keep[np.argsort(labels[keep], kind="stable")]
        counts = np.bincount(labels[keep], minlength=k).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if fingerprint is None:
            h = hashlib.sha256(b"croupier.assign.v1")
            h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
            fingerprint = f"assign:{h.hexdigest()[:16]}"
        return cls(offsets=offsets, members=order.astype(np.int64), num_samples=len(labels),
                   fingerprint=fingerprint)

    # -- queries --------------------------------------------------------------------------
    @property
    def num_clusters(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_positions(self) -> int:
        """How many samples the layout can draw from (all, or the selected subset)."""
        return int(self.offsets[-1])

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """Global sample ids at the given layout positions (vectorized)."""
        positions = np.asarray(positions, dtype=np.int64)
        if self.members is None:
            return positions
        return np.asarray(self.members[positions], dtype=np.int64)

    def clusters_of(self, positions: np.ndarray) -> np.ndarray:
        """Cluster index of each layout position (vectorized, O(log K) each)."""
        return np.searchsorted(self.offsets, np.asarray(positions, dtype=np.int64), side="right") - 1


def groups_of(ids: np.ndarray, group_of: GroupOf) -> np.ndarray:
    """The group of each id (int64), through a dense array or a callable."""
    ids = np.asarray(ids, dtype=np.int64)
    if callable(group_of):
        groups = np.asarray(group_of(ids), dtype=np.int64)
    else:
        table = np.asarray(group_of)
        if ids.size and (ids.min() < 0 or ids.max() >= table.size):
            bad = int(ids[(ids < 0) | (ids >= table.size)][0])
            raise ReportRefused("id", f"sample id {bad} is outside the group table's [0, {table.size})")
        groups = table[ids].astype(np.int64, copy=False)
    if groups.shape != ids.shape:
        raise ReportRefused("groups", f"the group mapping returned {groups.shape} groups for {ids.shape} ids")
    return groups


def layout_group_of(layout: ClusterLayout) -> Callable[[np.ndarray], np.ndarray]:
    """id -> cluster for a layout: O(1) memory for contiguous (cluster-major) layouts.

    With a member list (clusters are not id ranges) this builds an id -> cluster table of
    int32 (int64 beyond 2**31 clusters) of `num_samples` entries, -1 for ids outside the
    layout (a selection left them out); such an id in a report is refused (rule `id`).
    """
    if layout.members is None:
        offsets = layout.offsets
        num = layout.num_positions

        def contiguous(ids: np.ndarray) -> np.ndarray:
            if ids.size and (ids.min() < 0 or ids.max() >= num):
                bad = int(ids[(ids < 0) | (ids >= num)][0])
                raise ReportRefused("id", f"sample id {bad} is outside the layout's [0, {num})")
            return np.searchsorted(offsets, ids, side="right") - 1
        return contiguous
    dtype = np.int32 if layout.num_clusters < 2 ** 31 else np.int64
    table = np.full(layout.num_samples, -1, dtype=dtype)
    table[np.asarray(layout.members, dtype=np.int64)] = np.repeat(
        np.arange(layout.num_clusters, dtype=dtype), layout.sizes)

    def membered(ids: np.ndarray) -> np.ndarray:
        groups = groups_of(ids, table)
        if groups.size and groups.min() < 0:
            bad = int(ids[groups < 0][0])
            raise ReportRefused("id", f"sample id {bad} belongs to no cluster of the layout")
        return groups
    return membered
