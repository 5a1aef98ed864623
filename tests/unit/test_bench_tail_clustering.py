"""The clustering variants bench_tail_clustering compares, on a planted long tail."""

from __future__ import annotations

import math

import numpy as np

from bench.benchmarks.bench_tail_clustering import (
    balanced,
    bisecting,
    flat,
    hierarchical,
    neighbour_recall,
    quarter_means,
)
from croupier.shards.build.cluster import normalize
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


def test_hierarchical_merges_fine_clusters_of_one_dense_group() -> None:
    # one big dense group takes most of the fine clusters; on the centroids it becomes one
    x, groups = _planted((300, 60, 6))
    labels = hierarchical(x, 3, 12)
    assert labels.shape == groups.shape and len(np.unique(labels)) == 3
    assert nmi(labels, groups) > 0.99


def test_neighbour_recall_by_hand() -> None:
    x, groups = _planted((40, 20, 5))
    assert np.allclose(neighbour_recall(x, groups), 1.0)  # well separated: every neighbour is of the group
    # four points on a line, groups a b a b: each one's nearest is of the other group
    line = normalize(np.array([[1.0, 0.0], [1.0, 0.1], [1.0, 0.2], [1.0, 0.3]], dtype=np.float32))
    rec = neighbour_recall(line, np.array([0, 1, 0, 1]), k=1)
    assert rec.tolist() == [0.0, 0.0, 0.0, 0.0]
    rare, common = quarter_means(np.arange(65, dtype=float), groups)
    assert (rare, common) == (np.arange(60, 65).mean(), np.arange(40).mean())


def test_lsa_embeddings_keep_lexically_distinct_groups_apart() -> None:
    from bench.benchmarks.bench_tail_clustering import lsa

    texts = [f"alpha beta gamma {i}" for i in range(10)] + [f"delta epsilon zeta {i}" for i in range(10)]
    groups = np.repeat([0, 1], 10)
    for name in ("tfidf-words", "tfidf-chars"):
        x = lsa(texts, name, dim=4)
        assert x.shape == (20, 4) and np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
        assert np.allclose(neighbour_recall(x, groups, k=3), 1.0)
