"""Mixtures: generation speed and state size by source count, and time to first batch.

1. Generation: indices/s and sampler state bytes for mixtures of 1, 10, 100 and 1,000
   sources that together hold the same clusters (long-tailed sizes, clusterclip with a
   clip inside every source), against one source of all those clusters (the single-dataset
   engine), in the same process. Target: every mixture within 2x of one source (ratio >= 0.5).
2. Time to first batch over 100 local datasets (same MDS shards): croupier (load the mixture
   file, start the server in-process, a rank's dataset yields its first batch) against Mosaic
   Streaming's `StreamingDataset` over 100 `Stream`s (construct, first batch through a
   DataLoader). Ratio = streaming time / croupier time (> 1: croupier is faster).

Scales: full = 100k clusters, 1,000 steps of 4,096; quick = 20k clusters, 200 steps of 1,024;
both use 100 datasets of 64 documents for part 2. Figures on a shared 2-core machine are noisy.

    python -m bench.benchmarks.bench_mixture --scale quick
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SCALES = {"full": {"clusters": 100_000, "steps": 1000, "batch": 4096, "datasets": 100, "docs": 64},
          "quick": {"clusters": 20_000, "steps": 200, "batch": 1024, "datasets": 100, "docs": 64}}


def _sizes(k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.minimum(2000, np.floor(rng.pareto(1.2, k) * 40).astype(np.int64) + 5)


def _mix_text(sizes: np.ndarray, sources: int) -> str:
    parts = np.array_split(sizes, sources)
    out = []
    for i, part in enumerate(parts):
        out.append(f'[sources.s{i}]\ncluster_sizes = "{",".join(map(str, part.tolist()))}"\n'
                   f'weight = {1 + i % 5}\npolicy = "clusterclip"\nclip = 4\n')
    return "\n".join(out)


def _paired_rates(a, b, steps: int, batch: int, chunk: int = 25) -> tuple[float, float]:
    """ids/s of two samplers run in alternating chunks of steps, so that a change in the
    machine's load hits both alike (the machine is shared)."""
    a.next_batch()
    b.next_batch()
    ta = tb = 0.0
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        t = time.perf_counter()
        for _ in range(n):
            a.next_batch()
        ta += time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(n):
            b.next_batch()
        tb += time.perf_counter() - t
        done += n
    return steps * batch / ta, steps * batch / tb


def generation(scale: dict) -> list[dict]:
    from croupier.layout import ClusterLayout
    from croupier.mixture import open_mix, parse_mix
    from croupier.server.sampling.mixture import mixture_sampler
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.sampler import Sampler

    sizes = _sizes(scale["clusters"])
    b, steps = scale["batch"], scale["steps"]

    def one() -> Sampler:
        return Sampler(ClusterLayout.from_sizes(sizes), PolicyConfig("clusterclip", clip=4), b, 0)

    ref_state = len(one().state().to_bytes())
    rows = [{"bench": "mixture", "metric": "state, 1 source", "value": ref_state, "unit": "bytes",
             "reference": None, "ratio": None, "target": None}]
    for n in (10, 100, 1000):
        s = mixture_sampler(open_mix(parse_mix(_mix_text(sizes, n))), b, 0)
        ref, r = _paired_rates(one(), s, steps, b)
        state = len(s.state().to_bytes())
        rows.append({"bench": "mixture", "metric": f"generation, {n} sources vs 1 source, {len(sizes)} clusters",
                     "value": round(r), "unit": "ids/s", "reference": round(ref), "ratio": round(r / ref, 3),
                     "target": ">= 0.5"})
        rows.append({"bench": "mixture", "metric": f"state, {n} sources", "value": state, "unit": "bytes",
                     "reference": ref_state, "ratio": round(state / ref_state, 3), "target": None})
    return rows


def _datasets(root: Path, n: int, docs: int) -> list[Path]:
    from croupier.shards.build.builder import BuildConfig, Builder
    from croupier.shards.build.synthetic import generate_corpus, write_jsonl

    out = []
    for i in range(n):
        src = root / f"in{i}.jsonl"
        write_jsonl(src, generate_corpus(docs, 2, seed=i))
        ds = root / f"ds{i}"
        Builder(BuildConfig(out=str(ds), inputs=(str(src),), embedder="hashing", clusters=2, layout="cluster-major",
                            shard_size=1 << 14, progress=False)).run()
        out.append(ds)
    return out


def first_batch(scale: dict) -> list[dict]:
    import torch.utils.data as tud

    from croupier.client.dataset import CroupierIterableDataset
    from croupier.mixture import load_mix
    from croupier.server.job.job import Job, JobSpec
    from croupier.server.serving.service import create_server
    from croupier.topology import Topology

    root = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    try:
        sets = _datasets(root, scale["datasets"], scale["docs"])
        mix = root / "mix.toml"
        mix.write_text("\n".join(f'[sources.d{i}]\ndataset = "{p}"\nweight = {1 + i % 3}\npolicy = "uniform"\n'
                                 for i, p in enumerate(sets)))
        b = 32
        t0 = time.perf_counter()
        mixture = load_mix(mix)
        job = Job(None, None, b, 0, spec=JobSpec(name="mx"), mixture=mixture)
        server, port = create_server(job, "127.0.0.1:0")
        t_server = time.perf_counter() - t0
        t1 = time.perf_counter()
        ds = CroupierIterableDataset(f"127.0.0.1:{port}", "mx", cache_dir=root / "cache", steps=1,
                                     topology=Topology(0, 1), agent="")
        batch = next(iter(tud.DataLoader(ds, batch_size=b, collate_fn=list)))
        t_client = time.perf_counter() - t1
        assert len(batch) == b
        server.stop(0)

        from streaming import Stream, StreamingDataset

        t2 = time.perf_counter()
        streams = [Stream(local=str(p), proportion=(1 + i % 3) / (2 * len(sets))) for i, p in enumerate(sets)]
        sds = StreamingDataset(streams=streams, shuffle=True, batch_size=b, epoch_size=b * 4)
        got = next(iter(tud.DataLoader(sds, batch_size=b, collate_fn=list)))
        t_streaming = time.perf_counter() - t2
        assert len(got) == b
        total = t_server + t_client
        return [{"bench": "mixture", "metric": f"time to first batch, {len(sets)} local datasets (server start "
                 f"{t_server:.2f} s + rank {t_client:.2f} s)", "value": round(total, 3), "unit": "s",
                 "reference": round(t_streaming, 3), "ratio": round(t_streaming / total, 3), "target": None}]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(scale: str = "quick") -> list[dict]:
    cfg = SCALES[scale]
    return generation(cfg) + first_batch(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="quick")
    args = ap.parse_args()
    for row in run(args.scale):
        ratio = "" if row["ratio"] is None else f"  ratio {row['ratio']}"
        ref = "" if row["reference"] is None else f"  (reference {row['reference']})"
        print(f"{row['metric']}: {row['value']} {row['unit']}{ref}{ratio}")


if __name__ == "__main__":
    main()
