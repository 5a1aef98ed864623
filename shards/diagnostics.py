"""Does the clustering keep the long tail? Numbers to read before training.

Cluster-balanced sampling up-samples a rare topic only if the topic has clusters of its own.
Given the cluster of every sample and a metadata field (source, domain, language...), this
module measures how the field's groups spread over the clusters:

- cluster sizes: min / median / max and the Gini coefficient (0 = all equal, ~1 = one
  cluster holds everything);
- NMI between clusters and groups (arithmetic normalization, as scikit-learn's default);
- per group: its main cluster (the one holding most of its documents), its *purity* (the
  share of that main cluster the group makes up) and the share of the group living there;
- the groups *drowned* below a purity threshold (default 10%): balancing clusters gives them
  about their natural share, so the clustering hides them, and a WARNING says so;
- the rarest quarter of groups' share of the samples, and the share that balancing clusters
  would deal them (uniform over clusters, then uniform inside one). A clustering can drown
  few groups and still deal the tail its natural share, when it splits the large groups as
  finely as it keeps the rare ones apart; below MIN_TAIL_GAIN times the natural share a
  WARNING says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from croupier.errors import ConfigError

DEFAULT_DROWN = 0.10
MIN_TAIL_GAIN = 1.5
"""Balancing clusters should deal the rarest quarter of groups at least this many times its
natural share; below it the clustering does not up-sample the tail (a WARNING says so)."""


def gini(sizes: Sequence[int] | np.ndarray) -> float:
    """Gini coefficient of non-negative sizes (0 when all are equal)."""
    x = np.sort(np.asarray(sizes, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total == 0:
        return 0.0
    return float(2.0 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def size_stats(sizes: Sequence[int] | np.ndarray) -> dict[str, float]:
    """min / median / max / mean / Gini of the cluster sizes."""
    s = np.asarray(sizes, dtype=np.int64)
    if len(s) == 0:
        raise ConfigError("cluster sizes must not be empty")
    return {"min": int(s.min()), "median": float(np.median(s)), "max": int(s.max()),
            "mean": float(s.mean()), "gini": gini(s)}


def contingency(clusters: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse contingency table: (cluster, group, count) of every non-empty pair."""
    c = np.asarray(clusters, dtype=np.int64)
    g = np.asarray(groups, dtype=np.int64)
    if c.shape != g.shape or c.ndim != 1:
        raise ConfigError(f"clusters and groups must be 1-D arrays of one length, got {c.shape} and {g.shape}")
    if len(c) == 0:
        raise ConfigError("clusters and groups must not be empty")
    if c.min() < 0 or g.min() < 0:
        raise ConfigError("cluster and group labels must be >= 0")
    width = int(g.max()) + 1
    keys, counts = np.unique(c * width + g, return_counts=True)
    return keys // width, keys % width, counts.astype(np.int64)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def nmi(clusters: np.ndarray, groups: np.ndarray) -> float:
    """Normalized mutual information, MI / mean(H(clusters), H(groups)); 1.0 when both are constant."""
    ci, gi, nij = contingency(clusters, groups)
    n = float(nij.sum())
    a = np.bincount(ci, weights=nij)
    b = np.bincount(gi, weights=nij)
    hu, hv = _entropy(a), _entropy(b)
    if hu == 0.0 and hv == 0.0:
        return 1.0
    mi = float(np.sum(nij / n * (np.log(nij * n) - np.log(a[ci] * b[gi]))))
    return max(0.0, mi / ((hu + hv) / 2.0))


@dataclass
class GroupSpread:
    """How one group spreads over the clusters."""

    name: str
    docs: int
    main_cluster: int
    purity: float  # share of the main cluster made of this group
    share_in_main: float  # share of the group's documents in its main cluster
    clusters: int  # clusters holding at least one of its documents


@dataclass
class LongTailReport:
    """Clusters versus a metadata field: NMI, per-group purity and the drowned groups."""

    field: str
    nmi: float
    drown: float
    groups: list[GroupSpread]
    sizes: dict[str, float]
    rare_quarter_purity: float
    drowned: list[str] = dataclasses.field(default_factory=list)
    rare_quarter_share: float = 0.0  # the rarest quarter's share of the samples
    rare_quarter_balanced_share: float = 0.0  # its share under uniform-over-clusters sampling

    @property
    def tail_gain(self) -> float:
        """How many times its natural share balancing clusters deals the rarest quarter."""
        return self.rare_quarter_balanced_share / self.rare_quarter_share if self.rare_quarter_share else 1.0

    @property
    def tail_warning(self) -> str | None:
        if self.tail_gain >= MIN_TAIL_GAIN:
            return None
        return (f"WARNING: balancing these clusters deals the rarest quarter of {self.field!r} groups "
                f"{self.rare_quarter_balanced_share:.1%} of the samples against its natural "
                f"{self.rare_quarter_share:.1%} ({self.tail_gain:.2f}x, below {MIN_TAIL_GAIN}x): the large groups are "
                f"split as finely as the rare ones are kept apart, so cluster-balanced sampling will not up-sample "
                f"the tail (rebuild with --group-by {self.field})")

    @property
    def warning(self) -> str | None:
        if not self.drowned:
            return None
        return (f"WARNING: {len(self.drowned)} of {len(self.groups)} groups of {self.field!r} make up less than "
                f"{self.drown:.0%} of the cluster holding most of them: balancing clusters cannot up-sample them, "
                f"this clustering hides the long tail (rebuild with --group-by {self.field} to keep them apart)")

    def to_dict(self) -> dict[str, Any]:
        return {"field": self.field, "nmi": self.nmi, "drown": self.drown, "sizes": self.sizes,
                "rare_quarter_purity": self.rare_quarter_purity, "drowned": self.drowned,
                "warning": self.warning, "rare_quarter_share": self.rare_quarter_share,
                "rare_quarter_balanced_share": self.rare_quarter_balanced_share, "tail_gain": self.tail_gain,
                "tail_warning": self.tail_warning, "groups": [vars(g) for g in self.groups]}


def long_tail_report(clusters: np.ndarray, groups: np.ndarray, names: Sequence[str], field_name: str,
                     drown: float = DEFAULT_DROWN) -> LongTailReport:
    """Spread of the groups (codes into `names`) over the clusters of the same samples."""
    if not 0.0 < drown <= 1.0:
        raise ConfigError(f"the drown threshold must be in (0, 1], got {drown}")
    ci, gi, nij = contingency(clusters, groups)
    if int(gi.max()) >= len(names):
        raise ConfigError(f"group code {int(gi.max())} has no name ({len(names)} names given)")
    csize = np.bincount(ci, weights=nij).astype(np.int64)
    out: list[GroupSpread] = []
    order = np.lexsort((ci, -nij, gi))  # per group: largest count first, then smallest cluster id
    gs, first = np.unique(gi[order], return_index=True)
    spans = np.bincount(gi, minlength=len(names))
    docs = np.bincount(gi, weights=nij, minlength=len(names)).astype(np.int64)
    for g, j in zip(gs.tolist(), first.tolist()):
        k = order[j]
        c, m = int(ci[k]), int(nij[k])
        out.append(GroupSpread(name=str(names[g]), docs=int(docs[g]), main_cluster=c, purity=m / int(csize[c]),
                               share_in_main=m / int(docs[g]), clusters=int(spans[g])))
    by_size = sorted(out, key=lambda s: (s.docs, s.name))
    rare = by_size[:max(1, len(by_size) // 4)]
    drowned = [s.name for s in by_size if s.purity < drown]
    code = {str(n): i for i, n in enumerate(names)}
    in_rare = np.zeros(len(names), dtype=bool)
    in_rare[[code[s.name] for s in rare]] = True
    pick = in_rare[gi]
    balanced = float(np.sum(nij[pick] / csize[ci[pick]])) / len(np.unique(ci))  # 1/K per cluster, then its share
    return LongTailReport(field=field_name, nmi=nmi(clusters, groups), drown=drown, groups=out,
                          sizes=size_stats(np.bincount(np.asarray(clusters, dtype=np.int64))[np.unique(ci)]),
                          rare_quarter_purity=float(np.mean([s.purity for s in rare])), drowned=drowned,
                          rare_quarter_share=float(nij[pick].sum()) / float(nij.sum()),
                          rare_quarter_balanced_share=balanced)


def format_report(rep: LongTailReport, limit: int = 20) -> list[str]:
    """Human-readable lines: NMI, purity summary, the drowned groups (at most `limit`), the warning."""
    lines = [f"by {rep.field:<9}{len(rep.groups)} groups, NMI {rep.nmi:.3f}, mean purity "
             f"{np.mean([g.purity for g in rep.groups]):.1%}, rarest quarter's purity {rep.rare_quarter_purity:.1%}"]
    if rep.drowned:
        lines.append(f"drowned      {len(rep.drowned)} groups below {rep.drown:.0%} of their main cluster "
                     "(smallest first):")
        index = {g.name: g for g in rep.groups}
        for name in rep.drowned[:limit]:
            g = index[name]
            lines.append(f"  - {name}: {g.docs} docs, {g.purity:.1%} of cluster {g.main_cluster}, "
                         f"{g.share_in_main:.0%} of it there, over {g.clusters} clusters")
        if len(rep.drowned) > limit:
            lines.append(f"  ... and {len(rep.drowned) - limit} more")
        lines.append(rep.warning or "")
    else:
        lines.append(f"drowned      none: every group makes up at least {rep.drown:.0%} of its main cluster")
    lines.append(f"tail         rarest quarter: {rep.rare_quarter_share:.1%} of the samples, "
                 f"{rep.rare_quarter_balanced_share:.1%} under cluster-balanced sampling ({rep.tail_gain:.2f}x)")
    if rep.tail_warning:
        lines.append(rep.tail_warning)
    return lines
