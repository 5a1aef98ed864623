"""Derive a clip threshold from the training budget, without simulating a draw.

Measured caution (docs/sampling.md, "Auto clip"): when the budget nears clip x dataset, clusterclip knocks out
every cluster, smallest first, and the end of training collapses onto the largest one or two.
`derive_clip` picks the smallest clip T that keeps at least `min_active_share` of the
clusters active at the end of the budget.

Under uniform-over-active sampling every active cluster receives draws at the same rate, so
clusters are knocked out in size order. With sizes sorted ascending n_0 <= ... <= n_{K-1},
keeping m clusters active means cluster j = K - m (the smallest of the survivors) must not
reach T * n_j draws. If the j smaller clusters are exhausted (T * n_i each) and the rest share
what is left, cluster j expects E = (D - T * sum_{i<j} n_i) / (K - j) draws out of the budget
D = global_batch * budget_steps. T is the smallest integer with E + 3 sqrt(E) < T * n_j (a
three-sigma margin for sampling noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from croupier.errors import ConfigError


@dataclass(frozen=True)
class AutoClip:
    """The derived threshold and the figures behind it (for the dry-run summary)."""

    clip: int
    budget_draws: int
    keep_clusters: int
    num_clusters: int
    pivot_size: int
    pivot_expected_draws: float

    def reason(self) -> str:
        return (
            f"clip {self.clip} (auto): budget {self.budget_draws} draws; keeping >= {self.keep_clusters} "
            f"of {self.num_clusters} clusters active to the end needs the smallest survivor "
            f"(size {self.pivot_size}) below {self.clip} x {self.pivot_size} = {self.clip * self.pivot_size} "
            f"draws; it expects {self.pivot_expected_draws:.0f}"
        )


def derive_clip(sizes: np.ndarray, global_batch: int, budget_steps: int,
                min_active_share: float = 0.5) -> AutoClip:
    """Smallest clip that keeps `min_active_share` of clusters active over the budget."""
    sizes = np.sort(np.asarray(sizes, dtype=np.int64))
    k = len(sizes)
    if k == 0:
        raise ConfigError("auto clip needs at least one cluster")
    if budget_steps < 1 or global_batch < 1:
        raise ConfigError(f"auto clip needs a positive budget, got {budget_steps} steps of {global_batch}")
    if not 0.0 < min_active_share <= 1.0:
        raise ConfigError(f"min_active_share must be in (0, 1], got {min_active_share}")
    budget = int(global_batch) * int(budget_steps)
    keep = max(1, math.ceil(min_active_share * k))
    j = k - keep
    prefix = int(sizes[:j].sum())
    pivot = int(sizes[j])
    survivors = k - j

    def expected(t: int) -> float:
        return max(0.0, (budget - t * prefix) / survivors)

    t = max(1, budget // (prefix + survivors * pivot) + 1)
    while True:
        e = expected(t)
        if e + 3.0 * math.sqrt(e) < t * pivot:
            break
        t += 1
    return AutoClip(clip=int(t), budget_draws=budget, keep_clusters=keep, num_clusters=k,
                    pivot_size=pivot, pivot_expected_draws=expected(t))
