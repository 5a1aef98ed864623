"""Clusters from a metadata field: `croupier shards build --group-by FIELD`.

k-means splits big sources and merges rare ones into mixed clusters, so balancing clusters
does nothing for a rare source. With `--group-by FIELD` a field of the input records (source,
domain, language, URL host...) is the first level of the clustering: every group gets its
own clusters, either one per group (the default) or spherical k-means inside the group
(`--clusters-per-group N`, or the size rule `--cluster-size M`: about one cluster per M
documents of the group). A rare group therefore stays a cluster of its own. With
`--min-cluster-size S`, a group's k-means clusters under S documents are folded, smallest
first, into the sibling of the same group with the nearest centroid: a fixed count per group
otherwise cuts a 9-document group into 8 clusters of one or two, which cluster-balanced
sampling would repeat up to the clip; merging never crosses groups, so the rare groups stay
apart. It is not a default: it also takes back the weight those small clusters gave the
small groups (measured in docs/shards.md).

Cluster ids are group-major: groups in sorted order of their names, a group's clusters
consecutive; each group's k-means is seeded from (seed, group index), so a build is
deterministic for a seed. The sidecar records the grouping additively: the manifest key
`grouping` (field, rule, group names, group of every cluster) and `groups.npy`, the int32
group code of every sample id. Sidecars without them load as before. The build's stages
that use this are in `croupier.shards.build.stages.groups`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError
from croupier.format.atomic import write_npy_atomic
from croupier.shards.build import work_files
from croupier.shards.build.cluster import Assigner, KMeansConfig, normalize, train_centroids

GROUPS_FILE = "groups.npy"
"""Sidecar file: int32 (N,) group code of every sample id (an index into the group names)."""
MANIFEST_KEY = "grouping"


@dataclass(frozen=True)
class GroupingConfig:
    """How a field's groups become clusters: one per group, N per group, or one per M documents."""

    field: str
    clusters_per_group: int | None = None
    cluster_size: int | None = None
    min_cluster_size: int | None = None

    def __post_init__(self) -> None:
        if not self.field:
            raise ConfigError("--group-by must name a field, got an empty name")
        if self.clusters_per_group is not None and self.cluster_size is not None:
            raise ConfigError("give --clusters-per-group or --cluster-size, not both "
                              f"(got {self.clusters_per_group} and {self.cluster_size})")
        if self.clusters_per_group is not None and self.clusters_per_group < 1:
            raise ConfigError(f"--clusters-per-group must be >= 1, got {self.clusters_per_group}")
        if self.cluster_size is not None and self.cluster_size < 1:
            raise ConfigError(f"--cluster-size must be >= 1, got {self.cluster_size}")
        if self.min_cluster_size is not None:
            if self.min_cluster_size < 1:
                raise ConfigError(f"--min-cluster-size must be >= 1, got {self.min_cluster_size}")
            if self.clusters_per_group is None and self.cluster_size is None:
                raise ConfigError(f"--min-cluster-size {self.min_cluster_size} folds small clusters of the k-means "
                                  "inside a group: give --clusters-per-group or --cluster-size with it")

    def clusters_for(self, docs: int) -> int:
        """Clusters for a group of `docs` documents (never more than its documents)."""
        if self.cluster_size is not None:
            k = math.ceil(docs / self.cluster_size)
        else:
            k = self.clusters_per_group or 1
        return max(1, min(docs, k))

    def rule(self) -> str:
        if self.cluster_size is not None:
            text = f"one cluster per {self.cluster_size} documents of a group"
        else:
            text = f"{self.clusters_per_group or 1} cluster(s) per group"
        if self.min_cluster_size is not None:
            text += f", clusters under {self.min_cluster_size} documents folded into their group's nearest"
        return text


def merge_small(labels: np.ndarray, centroids: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold the clusters of one group under `min_size` documents into their nearest sibling.

    `labels` are the group's documents' cluster indices into `centroids` (unit rows). The
    smallest cluster under `min_size` (the lower index on a tie) goes into the other non-empty
    cluster whose centroid is most similar (the lower index on a tie), whose centroid becomes
    the normalized size-weighted mean of the two; this repeats until no cluster is under
    `min_size` or one is left. Returns the new labels (folded clusters left empty, to be
    dropped like any empty cluster) and centroids.
    """
    sizes = np.bincount(labels, minlength=len(centroids)).astype(np.int64)
    cent = np.asarray(centroids, dtype=np.float64).copy()
    target = np.arange(len(centroids))
    while True:
        alive = np.flatnonzero(sizes > 0)
        small = alive[sizes[alive] < min_size]
        if len(alive) < 2 or not len(small):
            break
        c = int(small[np.argmin(sizes[small])])  # argmin: the first (lowest index) of the smallest
        others = alive[alive != c]
        j = int(others[np.argmax(cent[others] @ cent[c])])
        merged = cent[j] * sizes[j] + cent[c] * sizes[c]
        cent[j] = merged / max(float(np.linalg.norm(merged)), 1e-12)
        sizes[j] += sizes[c]
        sizes[c] = 0
        target[target == c] = j
    return target[labels], cent.astype(np.float32)


def group_name(value: Any) -> str:
    """A group's name: a string value as it is, anything else as compact JSON (a numpy value, as
    an MDS column returns it, as the Python value it holds)."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def group_codes(values_of: Callable[[int, int], list[Any]], n: int, field: str,
                chunk: int = 65_536) -> tuple[np.ndarray, list[str]]:
    """int32 code of each of `n` documents and the sorted group names.

    `values_of(lo, hi)` returns the field's values of documents [lo, hi). Refuses a field with
    a single value and one with as many groups as documents (then every cluster would be one
    document: group by a coarser field).
    """
    tmp = np.empty(n, dtype=np.int32)
    seen: dict[str, int] = {}
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        tmp[lo:hi] = [seen.setdefault(group_name(v), len(seen)) for v in values_of(lo, hi)]
    names = sorted(seen)
    if len(names) < 2:
        only = names[0] if names else None
        raise ConfigError(f"--group-by {field!r}: the field has a single value ({only!r}) in all {n} documents; "
                          "grouping needs at least 2 groups")
    if len(names) >= n:
        raise ConfigError(f"--group-by {field!r}: {len(names)} groups for {n} documents; groups must be fewer "
                          "than documents (every document would be a cluster of its own): group by a coarser field")
    rank = np.empty(len(names), dtype=np.int32)
    for i, name in enumerate(names):
        rank[seen[name]] = i
    return rank[tmp], names


class _Rows:
    """Rows `ids` of a (memory-mapped) matrix, indexable like an array (for train_centroids)."""

    def __init__(self, matrix: np.ndarray, ids: np.ndarray) -> None:
        self.matrix, self.ids = matrix, ids
        self.shape: tuple[int, ...] = (len(ids), int(matrix.shape[1]))

    def __getitem__(self, sel: Any) -> np.ndarray:
        return np.asarray(self.matrix[np.sort(self.ids[sel])])


def group_seed(seed: int, group: int) -> int:
    """The k-means seed of group `group`: derived from (seed, group), never by adding them."""
    return int(np.random.SeedSequence([seed, group, 0x6A]).generate_state(1)[0] & 0x7FFFFFFF)


def cluster_by_group(embeddings: np.ndarray, codes: np.ndarray, num_groups: int, cfg: GroupingConfig, *,
                     seed: int, niter: int, max_train: int, out: np.ndarray, chunk: int = 65_536,
                     log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Write the (group-major) cluster of every document into `out`; returns (centroids, group of cluster).

    A group with one cluster gets the normalized mean of its embeddings as centroid; a group
    with more runs spherical k-means on (a bounded sample of) its own embeddings only.
    """
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes, minlength=num_groups)
    starts = np.concatenate([[0], np.cumsum(counts)])
    d = embeddings.shape[1]
    centroids: list[np.ndarray] = []
    cluster_group: list[np.ndarray] = []
    next_id = 0
    for g in range(num_groups):
        ids = order[starts[g]:starts[g + 1]]  # ascending: the sort is stable
        k = cfg.clusters_for(len(ids))
        if k == 1:
            total = np.zeros(d, dtype=np.float64)
            for lo in range(0, len(ids), chunk):
                total += normalize(embeddings[ids[lo:lo + chunk]]).sum(axis=0, dtype=np.float64)
            cent = normalize(total[None, :])
            out[ids] = next_id
        else:
            kcfg = KMeansConfig(clusters=k, seed=group_seed(seed, g), niter=niter, max_train=max(max_train, k))
            cent, _ = train_centroids(_Rows(embeddings, ids), kcfg)
            assigner = Assigner(cent)
            labels = np.empty(len(ids), dtype=np.int64)
            for lo in range(0, len(ids), chunk):
                labels[lo:lo + chunk], _ = assigner.assign(embeddings[ids[lo:lo + chunk]])
            if cfg.min_cluster_size is not None:
                labels, cent = merge_small(labels, cent, cfg.min_cluster_size)
            for lo in range(0, len(ids), chunk):
                out[ids[lo:lo + chunk]] = labels[lo:lo + chunk] + next_id
        centroids.append(cent)
        cluster_group.append(np.full(k, g, dtype=np.int32))
        next_id += k
        if log is not None and k > 1 and (g + 1) % 256 == 0:
            log(f"grouped k-means: {g + 1} of {num_groups} groups done")
    return np.concatenate(centroids).astype(np.float32), np.concatenate(cluster_group)


def write_group_files(work: Path, codes: np.ndarray, names: list[str]) -> None:
    """The build's work copy of every document's group code and the group names."""
    write_npy_atomic(work / work_files.GROUP_CODES, codes)
    (work / work_files.GROUP_NAMES).write_text(json.dumps(names))


def read_group_files(work: Path) -> tuple[np.ndarray, list[str]]:
    return np.load(work / work_files.GROUP_CODES), json.loads((work / work_files.GROUP_NAMES).read_text())


def finish(work: Path, side_dir: Path, cfg: GroupingConfig, order: np.ndarray | None) -> dict[str, Any]:
    """Write `groups.npy` (per sample id) into the sidecar; returns the manifest's `grouping` entry.

    `order` maps new sample ids to input positions when the shards were written cluster-major
    (None when ids are input positions). Clusters dropped as empty are dropped here too.
    """
    codes, names = read_group_files(work)
    remap = np.load(work / work_files.REMAP)
    raw_groups = np.load(work / work_files.CLUSTER_GROUPS_RAW)
    per_sample = codes if order is None else codes[np.asarray(order)]
    write_npy_atomic(side_dir / GROUPS_FILE, per_sample.astype(np.int32))
    return {
        "field": cfg.field,
        "clusters_per_group": cfg.clusters_per_group,
        "cluster_size": cfg.cluster_size,
        "min_cluster_size": cfg.min_cluster_size,
        "file": GROUPS_FILE,
        "names": names,
        "group_sizes": np.bincount(codes, minlength=len(names)).tolist(),
        "cluster_groups": raw_groups[remap >= 0].tolist(),
    }


@dataclass(frozen=True)
class SidecarGrouping:
    """The grouping a sidecar records: field, group names, group of every cluster."""

    field: str
    names: list[str]
    cluster_groups: np.ndarray
    codes_path: Path
    clusters_per_group: int | None = None
    cluster_size: int | None = None
    min_cluster_size: int | None = None

    def codes(self) -> np.ndarray:
        """int32 (N,) group code of every sample id (memmap)."""
        try:
            return np.load(self.codes_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"sidecar file {str(self.codes_path)!r} is missing or unreadable: {exc}") from exc

    def rule(self) -> str:
        return GroupingConfig(self.field, self.clusters_per_group, self.cluster_size, self.min_cluster_size).rule()


def read_grouping(side: Any) -> SidecarGrouping | None:
    """The grouping recorded in a `Sidecar`, or None for a sidecar built without --group-by."""
    entry = side.manifest.get(MANIFEST_KEY)
    if not entry:
        return None
    try:
        cg = np.asarray(entry["cluster_groups"], dtype=np.int64)
        names = [str(x) for x in entry["names"]]
        field = str(entry["field"])
        rel = str(entry.get("file", GROUPS_FILE))
    except (KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"sidecar manifest's {MANIFEST_KEY!r} entry is malformed: {exc}") from exc
    if len(cg) != side.num_clusters or (len(cg) and (cg.min() < 0 or cg.max() >= len(names))):
        raise DatasetError(f"sidecar manifest's {MANIFEST_KEY!r} entry does not match its {side.num_clusters} "
                           f"clusters and {len(names)} groups")
    from croupier.format.sidecar_layout import checked_relative

    return SidecarGrouping(field=field, names=names, cluster_groups=cg, codes_path=side.dir / checked_relative(rel),
                           clusters_per_group=entry.get("clusters_per_group"), cluster_size=entry.get("cluster_size"),
                           min_cluster_size=entry.get("min_cluster_size"))
