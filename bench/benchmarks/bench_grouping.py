"""Build cost of K in the thousands: flat k-means vs `--group-by` (k-means inside each group).

On N synthetic 384-d embeddings (float16 memmap, planted Zipf-sized groups, like MiniLM
output of a long-tailed corpus), each variant runs in a fresh process so its peak RSS is its
own:

- flat:      spherical k-means with K clusters over all documents (train on up to 262,144,
             assign every document), what `shards build --clusters K` does;
- grouped:   `--group-by` with the size rule `--cluster-size N/K`, which gives about K
             clusters in all, k-means inside each group only;
- per-group: `--group-by` with one cluster per group (no k-means at all).

Reported: seconds and peak RSS (MiB) of each, and the ratio flat / grouped. The machine is
shared (2 cores), so times are noisy.

Scales: full = 200k documents, K = 4096, 512 groups; quick = 50k, K = 1024, 256 groups;
1m = 1M documents, K = 4096, 1024 groups (the paper's setting; about 20 minutes on 2 cores).

    python -m bench.benchmarks.bench_grouping --scale quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCALES = {
    "full": {"docs": 200_000, "k": 4096, "groups": 512, "dim": 384, "niter": 20},
    "quick": {"docs": 50_000, "k": 1024, "groups": 256, "dim": 384, "niter": 20},
    "1m": {"docs": 1_000_000, "k": 4096, "groups": 1024, "dim": 384, "niter": 20},
}


def make_data(folder: Path, docs: int, groups: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    """float16 (docs, dim) embeddings around one random center per group, Zipf group sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, groups + 1) ** 1.1
    sizes = np.maximum(1, np.floor(weights / weights.sum() * docs)).astype(np.int64)
    sizes[0] += docs - sizes.sum()
    codes = np.repeat(np.arange(groups, dtype=np.int32), sizes)
    rng.shuffle(codes)
    centers = rng.standard_normal((groups, dim)).astype(np.float32)
    emb = np.lib.format.open_memmap(folder / "emb.npy", mode="w+", dtype=np.float16, shape=(docs, dim))
    for lo in range(0, docs, 65_536):
        c = codes[lo:lo + 65_536]
        emb[lo:lo + len(c)] = (centers[c] + 1.5 * rng.standard_normal((len(c), dim))).astype(np.float16)
    emb.flush()
    np.save(folder / "codes.npy", codes)
    return folder / "emb.npy", folder / "codes.npy"


def one(variant: str, folder: Path, k: int, niter: int) -> dict:
    """Run one variant in this process; returns seconds, clusters and peak RSS."""
    import numpy as np

    from croupier.shards.build.cluster import KMeansConfig, assign_all, train_centroids
    from croupier.shards.build.grouping import GroupingConfig, cluster_by_group

    emb = np.load(folder / "emb.npy", mmap_mode="r")
    codes = np.load(folder / "codes.npy")
    n = len(emb)
    out = np.empty(n, dtype=np.int32)
    t0 = time.perf_counter()
    if variant == "flat":
        cent, _ = train_centroids(emb, KMeansConfig(clusters=k, seed=0, niter=niter))
        assign_all(emb, cent, out)
        clusters = int(len(np.unique(out)))
    else:
        cfg = GroupingConfig("group", cluster_size=max(1, n // k)) if variant == "grouped" else GroupingConfig("group")
        _, cg = cluster_by_group(emb, codes, int(codes.max()) + 1, cfg, seed=0, niter=niter, max_train=262_144,
                                 out=out)
        clusters = int(len(cg))
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {"variant": variant, "seconds": dt, "clusters": clusters, "peak_rss_mib": rss}


def run(scale: str = "quick") -> list[dict]:
    s = SCALES[scale]
    rows = []
    with tempfile.TemporaryDirectory(prefix="croupier-bench-grouping-") as tmp:
        folder = Path(tmp)
        make_data(folder, s["docs"], s["groups"], s["dim"])
        res = {}
        for variant in ("flat", "grouped", "per-group"):
            p = subprocess.run([sys.executable, "-m", "bench.benchmarks.bench_grouping", "--one", variant, "--folder", str(folder),
                                "--k", str(s["k"]), "--niter", str(s["niter"])],
                               capture_output=True, text=True, check=True)
            res[variant] = json.loads(p.stdout.strip().splitlines()[-1])
        label = f"N={s['docs']} d={s['dim']}"
        for v, r in res.items():
            rows.append({"bench": "grouping", "metric": f"{v} k-means, {r['clusters']} clusters, {label}",
                         "value": round(r["seconds"], 2), "unit": "s", "reference": None, "ratio": None,
                         "target": None})
            rows.append({"bench": "grouping", "metric": f"{v} peak RSS", "value": round(r["peak_rss_mib"], 1),
                         "unit": "MiB", "reference": None, "ratio": None, "target": None})
        rows.append({"bench": "grouping", "metric": "flat / grouped time", "value": None, "unit": "x",
                     "reference": None, "ratio": round(res["flat"]["seconds"] / res["grouped"]["seconds"], 2),
                     "target": None})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="quick")
    ap.add_argument("--one", choices=("flat", "grouped", "per-group"), help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--niter", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, Path(args.folder), args.k, args.niter)))
        return 0
    for row in run(args.scale):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
