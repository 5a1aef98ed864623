"""Shared pieces of the shard-reading benchmarks: a cluster-major MDS dataset, read orders,
and a local "remote" with a per-file latency.

The dataset is written cluster-major (cluster c owns a contiguous id range, clusters in order,
long-tailed sizes) with zstd and hashes, like the shards/ pipeline writes it, so a
`ClusterLayout.from_sizes(sizes, block_size=block)` describes it exactly.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.parse
from pathlib import Path

import numpy as np

from croupier.layout import ClusterLayout

SLOW_SCHEME = "slowfile"


def long_tailed_sizes(n: int, k: int, seed: int = 0) -> np.ndarray:
    """k cluster sizes summing to n, Pareto-distributed (a few big clusters, many small)."""
    rng = np.random.default_rng(seed)
    w = rng.pareto(1.1, k) + 1e-3
    sizes = np.floor(w / w.sum() * (n - k)).astype(np.int64) + 1
    sizes[int(np.argmax(sizes))] += n - int(sizes.sum())
    return sizes


def write_cluster_major(root: Path, sizes: np.ndarray, size_limit: int, text_bytes: tuple[int, int] = (200, 800),
                        seed: int = 0) -> tuple[Path, int]:
    """Write an MDS dataset (zstd, xxh64) grouped by cluster, cluster 0 first; returns (root, block).

    Like `croupier shards build`, every cluster starts a fresh shard and each shard holds
    `block` consecutive samples of one cluster (the last of a cluster fewer), `block` filling
    three quarters of `size_limit` on average: the sampler's layout with that block size
    reads one shard at a time per cluster.
    """
    from streaming import MDSWriter

    n = int(sizes.sum())
    rng = np.random.default_rng(seed)
    lengths = rng.integers(text_bytes[0], text_bytes[1], n)
    pool = rng.choice(np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8), int(lengths.sum())).tobytes()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    block = max(1, int(0.75 * size_limit / float(np.mean(lengths + 32))))  # + MDS per-sample overhead
    columns = {"id": "int", "cluster": "int", "text": "str"}
    with MDSWriter(out=str(root), columns=columns, compression="zstd", hashes=["xxh64"],
                   size_limit=size_limit) as writer:
        for c in range(len(sizes)):
            for b0 in range(int(offsets[c]), int(offsets[c + 1]), block):
                if writer.new_samples:
                    writer.flush_shard()
                    writer._reset_cache()
                for i in range(b0, min(b0 + block, int(offsets[c + 1]))):
                    writer.write({"id": i, "cluster": c, "text": pool[starts[i]:starts[i + 1]].decode()})
    return root, block


def clusterclip_batches(layout: ClusterLayout, steps: int, batch: int, clip: int = 3, seed: int = 0) -> np.ndarray:
    """The global batches of croupier's sampler (policy clusterclip), shape (steps, batch)."""
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.sampler import Sampler

    sampler = Sampler(layout, PolicyConfig(policy="clusterclip", clip=clip), global_batch=batch, seed=seed)
    return np.stack([sampler.next_batch() for _ in range(steps)])


def read_in_steps(store, batches: np.ndarray, lookahead: int) -> int:
    """Read `batches` through a ShardStore as a trainer does; returns the samples read.

    Step t: prefetch step t + lookahead (the slices the server has streamed ahead), get step
    t, release step t.
    """
    for b in batches[:lookahead]:
        store.prefetch(b)
    read = 0
    for t, b in enumerate(batches):
        if t + lookahead < len(batches):
            store.prefetch(batches[t + lookahead])
        read += len(store.get(b))
        store.release(b)
    return read


def slow_remote(path: Path, latency_s: float) -> str:
    """A remote URL `slowfile://<path>` that serves local files after `latency_s` seconds each.

    It is a mosaicml-streaming downloader registered under its own scheme, so both croupier's
    store and `StreamingDataset` go through the same download path with the same latency.
    """
    from streaming.base.storage import download

    class _Slow(download.LocalDownloader):
        delay = 0.0

        @staticmethod
        def _client_identifier() -> str:
            return SLOW_SCHEME

        def _download_file_impl(self, remote: str, local: str, timeout: float) -> None:
            time.sleep(type(self).delay)
            src = urllib.parse.urlparse(remote).path
            tmp = f"{local}.tmp{os.getpid()}"
            shutil.copy(src, tmp)
            os.rename(tmp, local)

    cls = download.DOWNLOADER_MAPPINGS.get(SLOW_SCHEME)
    if cls is None:
        cls = download.DOWNLOADER_MAPPINGS[SLOW_SCHEME] = _Slow
    cls.delay = latency_s
    return f"{SLOW_SCHEME}://{Path(path).resolve()}"


def shard_ends(remote: Path) -> np.ndarray:
    """Cumulative sample counts of the shards of a local MDS dataset."""
    from croupier.format.mds_index import MDSIndex

    return MDSIndex.read(remote).table.ends
