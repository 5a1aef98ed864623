"""Download amplification of the shard store under a cache of 10% of the dataset.

amplification = bytes the store downloaded / bytes of the distinct shards the read sequence
touches (1.0 = every needed shard fetched once). The dataset is written cluster-major with
long-tailed cluster sizes (as `croupier shards build` writes it); the read sequence is
croupier's `clusterclip` sampler (clip 3) for a budget of half the dataset, fed to the store
as a trainer does: `prefetch(step t + lookahead)`, `get(step t)`, `release(step t)`.

Read sequences (the same cluster draws, clusterclip clip 3):
- block-local order: the layout's block size equals the samples per shard, so each cluster's
  pass walks its shards one at a time (keyed block order, keyed order inside a block); with
  a lookahead of 16 steps, the client's default of 64, and with every future step known;
- fully shuffled in-cluster order (block size 1), for contrast: every shard of every active
  cluster is needed at once.

reference = the amplification of an offline oracle (Belady: evict the shard needed farthest
in the future, knowing the whole sequence) with the same cache; ratio = store / oracle.
Targets: amplification <= 1.1, peak cache <= the limit.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SCALES = {
    "quick": {"n": 20_000, "k": 16, "size_limit": 8 << 10, "batch": 64, "lookahead": 64},
    "full": {"n": 200_000, "k": 64, "size_limit": 16 << 10, "batch": 256, "lookahead": 64},
}
CACHE_FRACTION = 0.10


def oracle_fetch_bytes(steps_shards: list[np.ndarray], fetch: np.ndarray, size: np.ndarray, capacity: int) -> int:
    """Bytes fetched by the farthest-next-use policy over the sequence of per-step shard sets."""
    seq = np.concatenate(steps_shards)
    nxt = np.full(seq.size, np.iinfo(np.int64).max, dtype=np.int64)
    last: dict[int, int] = {}
    for i in range(seq.size - 1, -1, -1):  # one pass over shard accesses, not samples
        s = int(seq[i])
        nxt[i] = last.get(s, nxt[i])
        last[s] = i
    resident: dict[int, int] = {}
    used = fetched = 0
    for i, s in enumerate(seq.tolist()):
        if s not in resident:
            fetched += int(fetch[s])
            while used + size[s] > capacity and resident:
                v = max(resident, key=resident.__getitem__)
                used -= int(size[v])
                del resident[v]
            used += int(size[s])
        resident[s] = int(nxt[i])
    return fetched


def read_through_store(remote: Path, cache: Path, batches: np.ndarray, limit: int, lookahead: int) -> dict:
    from bench.common.shard_data import read_in_steps
    from croupier.client.readers.shard_cache import ShardStore

    store = ShardStore(remote, cache, cache_limit=limit, prefetch_threads=4)
    t0 = time.perf_counter()
    read_in_steps(store, batches, lookahead)
    stats = store.stats()
    stats["seconds"] = time.perf_counter() - t0
    store.close()
    return stats


def run(scale: str = "full") -> list[dict]:
    from bench.common.shard_data import clusterclip_batches, long_tailed_sizes, write_cluster_major
    from croupier.client.readers.shard_cache import ShardStore
    from croupier.format.id_table import ShardTable
    from croupier.layout import ClusterLayout

    p = SCALES[scale]
    work = Path(tempfile.mkdtemp(prefix="croupier-bench-amp-"))
    rows: list[dict] = []
    try:
        sizes = long_tailed_sizes(p["n"], p["k"])
        remote, block = write_cluster_major(work / "remote", sizes, p["size_limit"], text_bytes=(100, 400))
        probe = ShardStore(remote, work / "probe")
        index: ShardTable = probe.index
        limit = int(probe.dataset_bytes * CACHE_FRACTION)
        fetch, size = probe._fetch_bytes, probe._disk_bytes
        steps = p["n"] // 2 // p["batch"]
        blocked = clusterclip_batches(ClusterLayout.from_sizes(sizes, block_size=block), steps, p["batch"])
        shuffled = clusterclip_batches(ClusterLayout.from_sizes(sizes), steps, p["batch"])
        cases = [("block-local order", blocked, p["lookahead"] // 4),
                 ("block-local order", blocked, p["lookahead"]),
                 ("block-local order, full horizon", blocked, steps),
                 ("fully shuffled in-cluster order", shuffled, p["lookahead"])]
        print(f"{index.num_shards} shards, {p['k']} clusters, {steps} steps x {p['batch']}, "
              f"cache limit {limit} B ({CACHE_FRACTION:.0%} of {probe.dataset_bytes} B)")
        for i, (name, batches, lookahead) in enumerate(cases):
            per_step = [np.unique(index.shard_of(b)) for b in batches]
            needed = probe.shard_fetch_bytes(np.unique(np.concatenate(per_step)))
            oracle = oracle_fetch_bytes(per_step, fetch, size, limit) / needed
            st = read_through_store(remote, work / f"cache{i}", batches, limit, lookahead)
            amp = st["bytes_downloaded"] / needed
            label = f"{name}, lookahead {lookahead}"
            print(f"  {label}: amplification {amp:.3f} (oracle {oracle:.3f}), {st['shards_downloaded']} "
                  f"downloads, {st['evictions']} evictions, peak cache {st['peak_cache_bytes'] / limit:.3f} "
                  f"of the limit, {st['seconds']:.1f}s")
            rows.append({"bench": "amplification", "metric": f"bytes fetched / needed ({label})",
                         "value": amp, "unit": "x", "reference": oracle, "ratio": amp / oracle,
                         "target": "<= 1.1"})
            rows.append({"bench": "amplification", "metric": f"peak cache / limit ({label})",
                         "value": st["peak_cache_bytes"] / limit, "unit": "x", "reference": None,
                         "ratio": None, "target": "<= 1.0"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", choices=tuple(SCALES), default="quick")
    args = parser.parse_args()
    from bench.common.table import format_table

    print(format_table(run(args.scale)))
