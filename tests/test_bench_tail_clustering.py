"""The clustering variants bench_tail_clustering compares, on a planted long tail."""

from __future__ import annotations

import math

import numpy as np

from bench.bench_tail_clustering import balanced, bisecting, flat
from croupier.shards.cluster import normalize
from croupier.shards.diagnostics import nmi


def _planted(sizes=(300, 60, 6), d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = np.eye(d)[: len(sizes)] * 4.0
    x = np.concatenate([c + rng.normal(scale=0.3, size=(n, d)) for c, n in zip(centers, sizes)])
    groups = np.repeat(np.arange(len(sizes)), sizes)
    return normalize(x.astype(np.float32)), groups


def test_flat_kmeans_recovers_well_separated_groups_of_equal_size() -> None:
    x, groups = _planted((100, 100, 100))
    labels = flat(x, 3)
    assert nmi(labels, groups) > 0.99


def test_bisecting_reaches_k_clusters_and_labels_every_document() -> None:
    x, groups = _planted()
    for by in ("spread", "sse"):
        labels = bisecting(x, 6, 2, by)
        assert labels.shape == groups.shape and labels.min() >= 0
        assert len(np.unique(labels)) == 6
        # splitting only ever divides clusters: each cluster still holds one planted group
        for c in np.unique(labels):
            assert len(np.unique(groups[labels == c])) == 1


def test_balanced_kmeans_respects_its_capacity() -> None:
    x, groups = _planted()
    k = 4
    labels = balanced(x, k)
    assert labels.min() >= 0
    assert np.bincount(labels, minlength=k).max() <= math.ceil(len(x) / k)
