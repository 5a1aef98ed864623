"""Subset selection from per-sample scores: top-k, lowest-k, inverse-propensity, random.

Every selector turns scores into one *priority* per sample (higher = keep first) and keeps
the k highest, globally or inside each cluster. All of it is vectorized numpy and a pure
function of (scores, k or fraction, labels, seed):

- ``askllm``: priority = score (top-k: keep what the proxy LM rates most informative).
- ``perplexity``: priority = -score (lowest-k perplexity).
- ``density``: k without replacement with probability proportional to 1/density
  (inverse propensity). Efraimidis-Spirakis: with weight w_i = 1/density_i and
  E_i ~ Exp(1), keeping the k smallest E_i / w_i = E_i * density_i is exactly weighted
  sampling without replacement; one random draw per sample, no loop over draws.
- ``random``: uniform k without replacement (priority = uniform noise).

Ties break toward the lower sample id, and NaN scores rank last, so a selection is fully
determined by its inputs. Selections are returned as sorted int64 ids.
"""

from __future__ import annotations

import math

import numpy as np

from croupier.errors import ConfigError

_SEED_TAG = 0x53454C45  # "SELE"

SELECTORS: tuple[str, ...] = ("askllm", "density", "perplexity", "random")


def keep_count(n: int, fraction: float) -> int:
    """How many of n samples a keep fraction keeps: round-half-up of fraction * n.

    The fraction must lie in (0, 1] and keep at least one sample.
    """
    f = float(fraction)
    if not (0.0 < f <= 1.0) or math.isnan(f):
        raise ConfigError(f"keep fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise ConfigError(f"cannot select from an empty set (n = {n})")
    k = min(n, int(math.floor(f * n + 0.5)))
    if k < 1:
        raise ConfigError(f"keep fraction {fraction} of {n} samples keeps no sample")
    return k


def check_selector(by: str) -> str:
    """Return `by` if it names a selector; else a ConfigError listing the valid ones."""
    if by not in SELECTORS:
        raise ConfigError(f"unknown selector {by!r}; valid: {', '.join(SELECTORS)}")
    return by


def priorities(by: str, scores: np.ndarray | None, n: int, seed: int = 0) -> np.ndarray:
    """Per-sample keep priority (float64, higher = kept first) for a selector.

    `scores` is required for askllm, density and perplexity and ignored for random.
    Density needs positive finite scores (a sketch count is >= 1 for every sample).
    """
    check_selector(by)
    rng = np.random.default_rng(np.random.SeedSequence([_SEED_TAG, int(seed), SELECTORS.index(by)]))
    if by == "random":
        return rng.random(n)
    if scores is None:
        raise ConfigError(f"selector {by!r} needs scores; run `croupier shards score --by {by}` first")
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ConfigError(f"scores have shape {s.shape}, expected ({n},)")
    if by == "askllm":
        pri = s.copy()
    elif by == "perplexity":
        pri = -s
    else:  # density: inverse propensity
        bad = ~(np.isfinite(s) & (s > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ConfigError(
                f"density scores must be positive and finite; sample {i} has {s[i]} "
                f"({int(bad.sum())} bad in all)"
            )
        pri = -(rng.standard_exponential(n) * s)
    pri[np.isnan(pri)] = -np.inf
    return pri


def top_k(priority: np.ndarray, k: int) -> np.ndarray:
    """Sorted ids of the k highest priorities (ties -> lower id)."""
    pri = np.asarray(priority, dtype=np.float64)
    n = len(pri)
    if not 0 <= k <= n:
        raise ConfigError(f"cannot keep {k} of {n} samples")
    if k == n:
        return np.arange(n, dtype=np.int64)
    # lexsort: last key is primary; sort by -priority, then id.
    order = np.lexsort((np.arange(n), -pri))
    return np.sort(order[:k]).astype(np.int64)


def allocate(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Per-group keep counts: fraction of each group, summing exactly to keep_count(total).

    Largest-remainder rounding (ties -> lower group index), never above a group's size.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    k = keep_count(total, fraction)
    exact = sizes.astype(np.float64) * (k / total)
    base = np.minimum(np.floor(exact).astype(np.int64), sizes)
    short = k - int(base.sum())
    if short > 0:
        rem = np.where(base < sizes, exact - base, -np.inf)
        order = np.lexsort((np.arange(len(sizes)), -rem))
        base[order[:short]] += 1
    return base


def top_k_per_group(priority: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted ids keeping `fraction` of each group (label) by priority, vectorized.

    Labels may include -1 (samples outside every cluster); they form their own group.
    The total kept is exactly keep_count(N, fraction).
    """
    pri = np.asarray(priority, dtype=np.float64)
    lab = np.asarray(labels, dtype=np.int64)
    if lab.shape != pri.shape:
        raise ConfigError(f"labels have shape {lab.shape}, priorities {pri.shape}")
    if (lab < -1).any():
        raise ConfigError(f"cluster labels must be >= -1, got {int(lab.min())}")
    group = lab + 1  # -1 -> group 0
    sizes = np.bincount(group)
    quota = allocate(sizes, fraction)
    n = len(pri)
    order = np.lexsort((np.arange(n), -pri, group))  # by group, then priority desc, then id
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    g_sorted = group[order]
    rank = np.arange(n) - starts[g_sorted]
    return np.sort(order[rank < quota[g_sorted]]).astype(np.int64)


def select(by: str, keep: float, *, scores: np.ndarray | None = None, n: int | None = None,
           labels: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Select a subset: sorted int64 ids of kept samples.

    by: one of SELECTORS. keep: fraction in (0, 1]. scores: the selector's scores (not for
    random). n: number of samples (defaults to len(scores)). labels: per-sample cluster
    labels to keep the fraction inside each cluster (per-cluster mode), or None for a
    global selection. seed: for density and random.
    """
    check_selector(by)
    if n is None:
        if scores is None:
            raise ConfigError("select needs n (number of samples) when no scores are given")
        n = len(scores)
    k = keep_count(n, keep)
    pri = priorities(by, scores, n, seed)
    if labels is None:
        return top_k(pri, k)
    return top_k_per_group(pri, labels, keep)


def top_fraction(priority: np.ndarray, keep: float, *, labels: np.ndarray | None = None,
                 candidates: np.ndarray | None = None) -> np.ndarray:
    """Sorted ids keeping `keep` of the candidates (sorted ids; None: every sample) by priority,
    globally or, with `labels`, inside every cluster: a quality cut after a filter."""
    pri = np.asarray(priority, dtype=np.float64)
    cand = np.arange(len(pri), dtype=np.int64) if candidates is None else np.asarray(candidates, dtype=np.int64)
    k = keep_count(len(cand), keep)
    if labels is None:
        local = top_k(pri[cand], k)
    else:
        local = top_k_per_group(pri[cand], np.asarray(labels)[cand], keep)
    return cand[local]


def at_threshold(scores: np.ndarray, threshold: float, higher_is_better: bool,
                 candidates: np.ndarray | None = None) -> np.ndarray:
    """Sorted ids of the candidates whose score is at least as good as `threshold` (>= it when higher
    is better, else <= it), compared in float32 as the scores are stored."""
    s = np.asarray(scores, dtype=np.float32)
    t = np.float32(threshold)
    keep = s >= t if higher_is_better else s <= t
    ids = np.flatnonzero(keep).astype(np.int64)
    return ids if candidates is None else np.intersect1d(ids, np.asarray(candidates, dtype=np.int64))


__all__: list[str] = ["SELECTORS", "at_threshold", "keep_count", "check_selector", "priorities", "top_k",
                      "allocate", "top_k_per_group", "select", "top_fraction"]
