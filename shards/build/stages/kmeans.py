"""The k-means stages: choose K, train the centroids, assign every document (local engine).

`ChooseK` fixes K (`--clusters`, else about sqrt N) once the documents are counted and
refuses more clusters than documents before anything is embedded. `TrainCentroids` runs
spherical k-means on a bounded, seeded sample of the embeddings on the driver (both engines).
`AssignChunks` is the local engine's assignment: the nearest centroid of every document,
chunk by chunk into a memory-mapped array, every chunk committed.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.format.atomic import write_npy_atomic
from croupier.shards.build import work_files
from croupier.shards.build.cluster import KMeansConfig, assign_all, num_gpus, train_centroids
from croupier.shards.build.config import BuildConfig, auto_clusters
from croupier.shards.build.context import BuildContext


def kmeans_config(cfg: BuildConfig, state: dict[str, Any]) -> KMeansConfig:
    """The k-means settings of a build whose state holds its K (`clusters`)."""
    k = int(state["clusters"])
    return KMeansConfig(clusters=k, seed=cfg.seed, niter=cfg.niter, max_train=max(cfg.max_train, k))


class ChooseK:
    """K for the whole corpus: `--clusters`, else `auto_clusters(N)`; never more than N."""

    name = "choose_k"

    def run(self, ctx: BuildContext) -> None:
        n = ctx.n
        k = ctx.cfg.clusters if ctx.cfg.clusters is not None else auto_clusters(n)
        if k > n:
            raise ConfigError(f"--clusters {k} is larger than the number of documents ({n})")
        ctx.state["clusters"] = k
        return None


class TrainCentroids:
    """Spherical k-means on a seeded sample of at most `--train-sample` embeddings."""

    name = "train"

    def run(self, ctx: BuildContext) -> int:
        kcfg = kmeans_config(ctx.cfg, ctx.state)
        emb = np.load(ctx.work / work_files.EMBEDDINGS, mmap_mode="r")
        t0 = time.perf_counter()
        sample = min(len(emb), kcfg.max_train)
        ctx.progress.log(f"k-means: {kcfg.clusters} clusters from a sample of {sample} of {len(emb)} documents "
                         f"({'GPU' if num_gpus() > 0 else 'CPU'}, seed {kcfg.seed})")
        centroids, obj = train_centroids(emb, kcfg)
        write_npy_atomic(ctx.work / work_files.CENTROIDS_RAW, centroids)
        ctx.timed(self.name, t0, sample)
        ctx.state["objective"] = obj
        return 0


class AssignChunks:
    """The local engine's assign stage: nearest centroid of every document, chunk by chunk."""

    name = "assign"

    def run(self, ctx: BuildContext) -> None:
        st = ctx.state
        emb = np.load(ctx.work / work_files.EMBEDDINGS, mmap_mode="r")
        centroids = np.load(ctx.work / work_files.CENTROIDS_RAW)
        n, c = len(emb), ctx.cfg.assign_chunk
        path = ctx.work / work_files.ASSIGN
        done = int(st.get("assign_chunks", 0))
        if done == 0 or not path.exists():
            done = 0
            out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(n,))
        else:
            out = np.load(path, mmap_mode="r+")
        bar = ctx.progress.bar("assign", total=n, initial=min(n, done * c))
        t0 = time.perf_counter()

        def on_chunk(i: int) -> None:
            out.flush()
            st["assign_chunks"] = i + 1
            ctx.commit(self.name, i)

        try:
            assign_all(emb, centroids, out, chunk=c, start_chunk=done, on_chunk=on_chunk, progress=bar)
        finally:
            bar.close()
        ctx.timed(self.name, t0, n - min(n, done * c))
        return None
