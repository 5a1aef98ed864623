"""Embedded dealing: time to first batch against StreamingDataset, and what dealing costs a rank.

1. Time to first batch, on one machine with no server: `CroupierIterableDataset.embedded`
   (open the sidecar, deal step 0, read the rank's slice through a DataLoader) against Mosaic
   Streaming's `StreamingDataset` over the same local MDS shards (construct, first batch
   through a DataLoader), on one dataset and over 100 datasets (a mixture file of 100 sources
   against 100 `Stream`s, as bench_mixture does for the server); a cold start (nothing
   decompressed yet) and a warm one, medians of alternating rounds. Ratio = croupier /
   StreamingDataset; target <= 1.0.
2. Dealing cost per step in embedded mode: every rank computes the whole global batch of every
   step, at global batch 4,096 over 100k long-tailed clusters (clusterclip), against
   the rank's read time for its slice (4,096 / world samples) from a warm local shard cache, at
   world 8 and 64. Ratio = dealing / read; target <= 0.05 at world 8. Also printed: the cost
   of taking the position's sampler state every step (a second sampler catching up, and an
   O(clusters) copy), which a reader pays only when it saves its state that often.

    python -m bench.benchmarks.bench_embedded --scale quick
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

SCALES = {"full": {"clusters": 100_000, "samples": 10_000_000, "batch": 4096, "steps": 200, "datasets": 100,
                   "docs": 64, "one_docs": 4000, "read_n": 40_000, "rounds": 9},
          "quick": {"clusters": 100_000, "samples": 10_000_000, "batch": 4096, "steps": 60, "datasets": 100,
                    "docs": 64, "one_docs": 2000, "read_n": 20_000, "rounds": 5}}


def _timed(make, b: int) -> float:
    """Seconds from constructing the dataset to its first batch through a DataLoader.

    The rest of the epoch is read afterwards, untimed, so no background thread of this start
    (StreamingDataset prepares the epoch's shards in threads of its own) runs into the next."""
    import torch.utils.data as tud

    gc.collect()
    t0 = time.perf_counter()
    it = iter(tud.DataLoader(make(), batch_size=b, collate_fn=list))
    got = next(it)
    elapsed = time.perf_counter() - t0
    assert len(got) == b
    for _ in it:
        pass
    return elapsed


def _drop_decompressed(folders: list[Path]) -> None:
    """Deletes the shards StreamingDataset decompressed next to their compressed files, so its
    next start is a first start again (it decompresses into the dataset's own folder)."""
    for folder in folders:
        for z in folder.glob("*.mds.zstd"):
            z.with_suffix("").unlink(missing_ok=True)


def first_batch(scale: dict) -> list[dict]:
    """Time to first batch, croupier embedded against StreamingDataset, in alternating rounds.

    Both libraries are imported and run once before timing (no import in a figure). Each round
    times a cold start (croupier: an empty cache folder; StreamingDataset: the dataset folders
    without the shards it decompressed there) and then a warm one (both find their
    decompressed shards), the two libraries in turns, first one then the other; the figures
    are the medians over the rounds."""
    from streaming import Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    from bench.benchmarks.bench_mixture import _datasets
    from croupier.client.dataset import CroupierIterableDataset
    from croupier.topology import Topology

    b, rounds = 32, scale["rounds"]
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    try:
        (root / "one").mkdir()
        (root / "many").mkdir()
        one = _datasets(root / "one", 1, scale["one_docs"])[0]
        many = _datasets(root / "many", scale["datasets"], scale["docs"])
        mix = root / "mix.toml"
        mix.write_text("\n".join(f'[sources.d{i}]\ndataset = "{p}"\nweight = {1 + i % 3}\npolicy = "uniform"\n'
                                 for i, p in enumerate(many)))

        def croupier_one(cache: Path):
            return CroupierIterableDataset.embedded(one, policy="uniform", global_batch=b, cache_dir=cache,
                                                    topology=Topology(0, 1), steps=1)

        def croupier_many(cache: Path):
            return CroupierIterableDataset.embedded(mix=mix, global_batch=b, cache_dir=cache,
                                                    topology=Topology(0, 1), steps=1)

        def streaming_one():
            clean_stale_shared_memory()
            return StreamingDataset(local=str(one), shuffle=True, batch_size=b)

        def streaming_many():
            clean_stale_shared_memory()
            return StreamingDataset(streams=[Stream(local=str(p), proportion=(1 + i % 3) / (2 * len(many)))
                                             for i, p in enumerate(many)],
                                    shuffle=True, batch_size=b, epoch_size=b * 4)

        for label, folders, make_croupier, make_streaming in (
                ("1 local dataset", [one], croupier_one, streaming_one),
                (f"{len(many)} local datasets", many, croupier_many, streaming_many)):
            rows += _alternating(label, folders, make_croupier, make_streaming, root, rounds, b)
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _alternating(label: str, folders: list[Path], make_croupier, make_streaming, root: Path, rounds: int,
                 b: int) -> list[dict]:
    """Rows of one comparison: warm-up, then `rounds` alternating rounds of a cold and a warm start."""
    _timed(lambda: make_croupier(root / "warmup"), b)  # imports and first-use setup, both
    _timed(make_streaming, b)
    times: dict[str, list[float]] = {f"{lib} {start}": [] for lib in ("croupier", "streaming")
                                     for start in ("cold", "warm")}
    for r in range(rounds):
        cache = root / f"cache{r}"
        for start in ("cold", "warm"):
            for lib in (("croupier", "streaming") if r % 2 == 0 else ("streaming", "croupier")):
                if lib == "croupier":
                    times[f"croupier {start}"].append(_timed(lambda: make_croupier(cache), b))  # noqa: B023
                    continue
                if start == "cold":
                    _drop_decompressed(folders)
                times[f"streaming {start}"].append(_timed(make_streaming, b))
        shutil.rmtree(cache, ignore_errors=True)
    rows = []
    for start in ("cold", "warm"):
        mine = statistics.median(times[f"croupier {start}"])
        ref = statistics.median(times[f"streaming {start}"])
        rows.append({"bench": "embedded", "metric": f"time to first batch, embedded, {label}, {start} start "
                     f"(median of {rounds} alternating rounds)", "value": round(mine, 4), "unit": "s",
                     "reference": round(ref, 4), "ratio": round(mine / ref, 3), "target": "<= 1.0"})
    return rows


class _Synthetic:
    """An embedded job over a synthetic layout (dealing only: no shards are read)."""

    tokens = None  # steps in documents

    def __init__(self, layout, batch: int) -> None:
        self.layout, self.global_batch = layout, batch

    def open(self):
        from croupier.client.embedded import EmbeddedSequence
        from croupier.proto import pb2
        from croupier.server.sampling.policy import PolicyConfig
        from croupier.server.sampling.sampler import Sampler

        config = PolicyConfig(policy="clusterclip", clip=4)
        return EmbeddedSequence(lambda: Sampler(self.layout, config, self.global_batch, 0), pb2.JobInfo())


def dealing(scale: dict) -> list[dict]:
    from bench.common.shard_data import clusterclip_batches, long_tailed_sizes, read_in_steps, write_cluster_major
    from croupier.client.embedded import EmbeddedDealer
    from croupier.client.readers.shard_cache import ShardCache
    from croupier.layout import ClusterLayout
    from croupier.topology import Topology

    b, steps = scale["batch"], scale["steps"]
    layout = ClusterLayout.from_sizes(long_tailed_sizes(scale["samples"], scale["clusters"]))
    rows = []
    root = Path(tempfile.mkdtemp(prefix="bench-deal-"))
    try:
        sizes = long_tailed_sizes(scale["read_n"], 256, seed=1)
        remote, block = write_cluster_major(root / "ds", sizes, 64 << 10)
        read_layout = ClusterLayout.from_sizes(sizes, block_size=block)
        store = ShardCache(str(remote), root / "cache", prefetch_threads=4)
        try:
            read_in_steps(store, np.arange(scale["read_n"]).reshape(-1, 1000), 4)  # warm: every shard is local
            for world in (8, 64):
                p = b // world
                batches = clusterclip_batches(read_layout, steps, p)  # the rank's slices
                dealer = EmbeddedDealer(_Synthetic(layout, b), Topology(0, world), lookahead=16)
                dealer.plan(0, None, on_slice=lambda step, ids: None)
                dealer.next_slice()  # opening: the samplers are built once
                t0 = time.perf_counter()
                for _ in range(steps):
                    dealer.next_slice()
                deal = (time.perf_counter() - t0) / steps
                t0 = time.perf_counter()
                for step in range(2, steps + 2):  # a state every step: what StatefulDataLoader asks of a worker
                    dealer.state_before(step)
                state_cost = (time.perf_counter() - t0) / steps
                t1 = time.perf_counter()
                for t in range(steps):
                    ids = batches[t]
                    assert len(store.get(ids)) == p
                    store.release(ids)
                read = (time.perf_counter() - t1) / steps
                rows.append({"bench": "embedded", "metric": f"dealing per step, {scale['clusters']:,} clusters, "
                             f"global batch {b}, world {world} (read of the rank's {p} samples: reference)",
                             "value": round(deal * 1e3, 3), "unit": "ms", "reference": round(read * 1e3, 3),
                             "ratio": round(deal / read, 4), "target": "<= 0.05" if world == 8 else None})
                rows.append({"bench": "embedded", "metric": f"sampler state of the position, taken every step, "
                             f"world {world} (read: reference)", "value": round(state_cost * 1e3, 3), "unit": "ms",
                             "reference": round(read * 1e3, 3), "ratio": round(state_cost / read, 4), "target": None})
        finally:
            store.close()
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(scale: str = "quick") -> list[dict]:
    cfg = SCALES[scale]
    return first_batch(cfg) + dealing(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="quick")
    args = ap.parse_args()
    for row in run(args.scale):
        print(f"{row['metric']}: {row['value']} {row['unit']}  (reference {row['reference']})  ratio {row['ratio']}"
              f"  target {row['target']}")


if __name__ == "__main__":
    main()
