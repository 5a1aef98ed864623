"""Read throughput from a cold cache: croupier's shard store vs mosaicml-streaming's StreamingDataset.

Same MDS shards (cluster-major, long-tailed clusters, zstd + xxh64), same number of samples,
each reader with a fresh cache directory:
- croupier: `ShardStore` reading the global batches of the `clusterclip` sampler (clip 3), as
  a trainer does (`prefetch(step t + 16)`, `get(step t)`, `release(step t)`), 4 threads;
- reference: `StreamingDataset(shuffle=True)` iterated for the same number of samples (its own
  shuffle and its own pre-download thread), no cache limit for either.

Twice: with the remote a local folder, and with every file of the remote served after an
artificial latency (a `slowfile://` downloader registered with mosaicml-streaming, so both
readers pay it on the same download path). Samples/s include opening the dataset.
Target: ratio (croupier / StreamingDataset) >= 1.0. StreamingDataset's /dev/shm segments are
cleaned afterwards.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SCALES = {
    "quick": {"n": 20_000, "k": 32, "size_limit": 32 << 10, "batch": 64, "read": 16_000, "latency_s": 0.02},
    "full": {"n": 400_000, "k": 256, "size_limit": 256 << 10, "batch": 256, "read": 300_000, "latency_s": 0.05},
}
LOOKAHEAD = 16


def store_samples_per_s(remote: str, cache: Path, batches: np.ndarray) -> tuple[float, dict]:
    from bench.common.shard_data import read_in_steps
    from croupier.client.readers.shard_cache import ShardStore

    t0 = time.perf_counter()
    store = ShardStore(remote, cache, prefetch_threads=4)
    read = read_in_steps(store, batches, LOOKAHEAD)
    elapsed = time.perf_counter() - t0
    stats = store.stats()
    store.close()
    return read / elapsed, stats


def streaming_samples_per_s(remote: str, cache: Path, count: int, batch: int) -> float:
    from streaming import StreamingDataset

    t0 = time.perf_counter()
    ds = StreamingDataset(remote=remote, local=str(cache), shuffle=True, batch_size=batch, shuffle_seed=0)
    read = 0
    for _ in ds:
        read += 1
        if read >= count:
            break
    elapsed = time.perf_counter() - t0
    ds._iterator.exit()  # stop its pre-download thread: a broken-off epoch does not
    return read / elapsed


def run(scale: str = "full") -> list[dict]:
    from streaming.base.util import clean_stale_shared_memory

    from bench.common.shard_data import clusterclip_batches, long_tailed_sizes, slow_remote, write_cluster_major
    from croupier.layout import ClusterLayout

    p = SCALES[scale]
    work = Path(tempfile.mkdtemp(prefix="croupier-bench-read-"))
    rows: list[dict] = []
    try:
        sizes = long_tailed_sizes(p["n"], p["k"])
        local, block = write_cluster_major(work / "remote", sizes, p["size_limit"])
        batches = clusterclip_batches(ClusterLayout.from_sizes(sizes, block_size=block), p["read"] // p["batch"],
                                      p["batch"])
        count = batches.size
        for name, remote in (("local remote", str(local)),
                             (f"remote with {p['latency_s'] * 1e3:.0f} ms per file",
                              slow_remote(local, p["latency_s"]))):
            tag = len(rows)
            ours, stats = store_samples_per_s(remote, work / f"store{tag}", batches)
            theirs = streaming_samples_per_s(remote, work / f"sd{tag}", count, p["batch"])
            clean_stale_shared_memory()
            print(f"  {name}: croupier {ours:,.0f} samples/s ({stats['shards_downloaded']} shards, "
                  f"{stats['wait_seconds']:.2f}s blocked), StreamingDataset {theirs:,.0f} samples/s")
            rows.append({"bench": "read", "metric": f"cold-cache samples/s, {count} samples ({name})",
                         "value": ours, "unit": "samples/s", "reference": theirs, "ratio": ours / theirs,
                         "target": "ratio >= 1.0"})
    finally:
        clean_stale_shared_memory()
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=tuple(SCALES), default="quick")
    args = parser.parse_args()
    from bench.common.table import format_table

    print(format_table(run(args.scale)))
