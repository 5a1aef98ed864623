"""Spherical k-means with faiss: train on a bounded sample, assign everything in chunks.

Embeddings are unit-normalized in float32 chunk by chunk (the on-disk copy is float16), so
the cosine metric is an inner product. Training uses at most `max_train` points drawn
without replacement by a seeded generator; assignment streams the whole (memory-mapped)
matrix through an inner-product index in chunks, so memory stays O(chunk + K * d). A GPU
index is used when faiss was built with GPUs and sees one; on CPU the result is
deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from croupier.errors import ConfigError
from croupier.optional import require

METRICS = ("cosine",)


def normalize(x: np.ndarray) -> np.ndarray:
    """float32 copy of `x` with unit-norm rows (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32).copy()
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def _faiss():
    return require("faiss", "k-means clustering")


def check_available() -> None:
    """Raises MissingDependency (what to pip install) when faiss is not installed."""
    _faiss()


def num_gpus() -> int:
    faiss = _faiss()

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


@dataclass(frozen=True)
class KMeansConfig:
    """k-means settings recorded in the sidecar manifest."""

    clusters: int
    seed: int = 0
    niter: int = 20
    max_train: int = 262_144
    metric: str = "cosine"

    def __post_init__(self) -> None:
        if self.clusters < 1:
            raise ConfigError(f"the number of clusters must be >= 1, got {self.clusters}")
        if self.niter < 1:
            raise ConfigError(f"k-means iterations must be >= 1, got {self.niter}")
        if self.max_train < self.clusters:
            raise ConfigError(f"the training sample ({self.max_train}) must be at least the number of "
                              f"clusters ({self.clusters})")
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; valid metrics: {', '.join(METRICS)}")

    def to_dict(self) -> dict:
        return {"clusters": self.clusters, "seed": self.seed, "niter": self.niter,
                "max_train": self.max_train, "metric": self.metric}


def training_sample_ids(n: int, cfg: KMeansConfig) -> np.ndarray:
    """Sorted ids of the training sample: all when n <= max_train, else a seeded draw."""
    if cfg.clusters > n:
        raise ConfigError(f"cannot make {cfg.clusters} clusters from {n} documents: "
                          f"--clusters must be <= the number of documents")
    if n <= cfg.max_train:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, n, 0xC1]))
    return np.sort(rng.choice(n, size=cfg.max_train, replace=False)).astype(np.int64)


class Rows(Protocol):
    """An (N, d) matrix read by rows: a (memory-mapped) array, or a view of some of its rows."""

    shape: tuple[int, ...]

    def __getitem__(self, sel: Any) -> Any: ...


def train_centroids(embeddings: Rows, cfg: KMeansConfig, *, gpu: bool | None = None,
                    verbose: bool = False) -> tuple[np.ndarray, float]:
    """Train spherical k-means on a bounded sample of `embeddings` (N, d), any float dtype.

    Returns (unit-norm float32 centroids (K, d), final objective).
    """
    faiss = _faiss()

    n, d = embeddings.shape
    ids = training_sample_ids(n, cfg)
    x = normalize(embeddings[ids])
    use_gpu = num_gpus() > 0 if gpu is None else bool(gpu)
    km = faiss.Kmeans(d, cfg.clusters, niter=cfg.niter, seed=cfg.seed, spherical=True,
                      gpu=use_gpu, verbose=verbose, max_points_per_centroid=max(1, len(x) // cfg.clusters + 1),
                      min_points_per_centroid=1)
    km.train(x)
    centroids = normalize(km.centroids.reshape(cfg.clusters, d))
    return centroids, float(km.obj[-1]) if len(km.obj) else float("nan")


class Assigner:
    """Nearest-centroid (max inner product) search over chunks of embeddings."""

    def __init__(self, centroids: np.ndarray, *, gpu: bool | None = None) -> None:
        faiss = _faiss()

        c = normalize(centroids)
        index = faiss.IndexFlatIP(c.shape[1])
        if (num_gpus() > 0 if gpu is None else gpu):
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(c)
        self.index = index

    def assign(self, chunk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cluster id int32, cosine similarity float32) of each row of `chunk`."""
        sims, ids = self.index.search(normalize(chunk), 1)
        return ids[:, 0].astype(np.int32), sims[:, 0].astype(np.float32)


def assign_all(embeddings: np.ndarray, centroids: np.ndarray, out: np.ndarray, *, chunk: int = 65_536,
               start_chunk: int = 0, on_chunk: Callable[[int], None] | None = None,
               progress: Iterable | None = None) -> float:
    """Write the cluster id of every row into `out` (int32, len N), chunk by chunk.

    Chunks before `start_chunk` are taken as done (resume); `on_chunk(i)` runs after
    chunk i is written. Returns the summed (1 - cosine) over the chunks processed.
    """
    n = embeddings.shape[0]
    assigner = Assigner(centroids)
    inertia = 0.0
    for i in range(start_chunk, (n + chunk - 1) // chunk):
        lo, hi = i * chunk, min(n, (i + 1) * chunk)
        labels, sims = assigner.assign(embeddings[lo:hi])
        out[lo:hi] = labels
        inertia += float(np.sum(1.0 - sims, dtype=np.float64))
        if progress is not None:
            progress.update(hi - lo)  # type: ignore[attr-defined]
        if on_chunk is not None:
            on_chunk(i)
    return inertia
