"""Sampler throughput, memory and checkpoint cost: croupier vs torch's DistributedSampler.

Same run, same machine, separate child processes (so each peak RSS is its own):
- croupier `clusterclip` (clip 3) over N samples in K long-tailed clusters, global batch B,
  producing I indices, vs `torch.utils.data.DistributedSampler(shuffle=True)` over the same N
  producing the same I indices in batches of B (its epoch start materializes a permutation of
  all N samples as a Python list: that is part of its cost, and paid again every epoch);
- croupier alone at N = 1e9, K = 1e5 (DistributedSampler would need ~40 GB there);
- sampler state save + load time (bytes round trip) and state size.

Scales: full = the issue's sizes (N=1e8, K=1e4, I=2e7; N=1e9, K=1e5); quick = a tenth.
Targets: ratio >= 1.0; memory at N=1e9 under 100 MB; state save+load under 10 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SCALES = {
    "full": {"n": 10**8, "k": 10**4, "indices": 2 * 10**7, "big_n": 10**9, "big_k": 10**5, "big_indices": 10**7},
    "quick": {"n": 10**7, "k": 10**3, "indices": 2 * 10**6, "big_n": 10**9, "big_k": 10**5, "big_indices": 2 * 10**6},
}
BATCH = 4096


def _long_tailed_sizes(n: int, k: int):
    import numpy as np

    rng = np.random.default_rng(0)
    w = rng.pareto(1.1, k) + 1e-3
    sizes = np.floor(w / w.sum() * (n - k)).astype(np.int64) + 1
    sizes[0] += n - sizes.sum()
    return sizes


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). getrusage's ru_maxrss would carry over the
    parent's high-water mark across fork + exec, so a benchmark child would report its
    parent's memory."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def child_croupier(n: int, k: int, indices: int) -> dict:
    from croupier.layout import ClusterLayout
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.sampler import Sampler
    from croupier.server.sampling.state import SamplerState

    layout = ClusterLayout.from_sizes(_long_tailed_sizes(n, k))
    t0 = time.perf_counter()
    s = Sampler(layout, PolicyConfig("clusterclip", clip=3), BATCH, 0)
    first = None
    produced = 0
    while produced < indices:
        s.next_batch()
        if first is None:
            first = time.perf_counter() - t0
        produced += BATCH
    elapsed = time.perf_counter() - t0
    st = s.state()
    t1 = time.perf_counter()
    for _ in range(20):
        blob = st.to_bytes()
        s.load_state(SamplerState.from_bytes(blob))
    save_load = (time.perf_counter() - t1) / 20
    return {"rate": produced / elapsed, "first_batch_s": first, "save_load_s": save_load,
            "state_bytes": len(blob), "peak_rss_mb": _peak_rss_mb()}


def child_torch(n: int, indices: int) -> dict:
    import itertools

    import torch
    from torch.utils.data import DistributedSampler

    class _Sized:
        def __len__(self) -> int:
            return n

    torch.manual_seed(0)
    t0 = time.perf_counter()
    sampler = DistributedSampler(_Sized(), num_replicas=1, rank=0, shuffle=True, seed=0)
    it = iter(sampler)
    first = None
    produced = 0
    while produced < indices:
        batch = list(itertools.islice(it, BATCH))
        if first is None:
            first = time.perf_counter() - t0
        produced += len(batch)
    elapsed = time.perf_counter() - t0
    return {"rate": produced / elapsed, "first_batch_s": first,
            "peak_rss_mb": _peak_rss_mb()}


def _in_child(fn: str, *args: int) -> dict:
    code = f"import json, bench.benchmarks.bench_sampler as b; print(json.dumps(b.{fn}(*{args!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(scale: str = "full") -> list[dict]:
    p = SCALES[scale]
    ours = _in_child("child_croupier", p["n"], p["k"], p["indices"])
    ref = _in_child("child_torch", p["n"], p["indices"])
    big = _in_child("child_croupier", p["big_n"], p["big_k"], p["big_indices"])
    name = f"sampler N={p['n']:.0e} K={p['k']:.0e}"
    return [
        {"bench": name, "metric": f"indices/s ({p['indices']:.0e} indices, B={BATCH})", "value": ours["rate"],
         "unit": "idx/s", "reference": ref["rate"], "ratio": ours["rate"] / ref["rate"], "target": ">= 1.0"},
        {"bench": name, "metric": "time to first batch", "value": ours["first_batch_s"], "unit": "s",
         "reference": ref["first_batch_s"], "ratio": ref["first_batch_s"] / ours["first_batch_s"],
         "target": "(info)"},
        {"bench": name, "metric": "peak RSS", "value": ours["peak_rss_mb"], "unit": "MB",
         "reference": ref["peak_rss_mb"], "ratio": ref["peak_rss_mb"] / ours["peak_rss_mb"], "target": "(info)"},
        {"bench": f"sampler N={p['big_n']:.0e} K={p['big_k']:.0e}", "metric": "indices/s", "value": big["rate"],
         "unit": "idx/s", "reference": None, "ratio": None, "target": "(info)"},
        {"bench": f"sampler N={p['big_n']:.0e} K={p['big_k']:.0e}", "metric": "peak RSS", "value": big["peak_rss_mb"],
         "unit": "MB", "reference": None, "ratio": None, "target": "< 100 MB"},
        {"bench": f"sampler N={p['big_n']:.0e} K={p['big_k']:.0e}", "metric": "state save+load",
         "value": big["save_load_s"] * 1e3, "unit": "ms", "reference": None, "ratio": None,
         "target": f"< 10 ms ({big['state_bytes']} bytes)"},
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    args = ap.parse_args(argv)
    from bench.common.table import format_table

    print(format_table(run(args.scale)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
