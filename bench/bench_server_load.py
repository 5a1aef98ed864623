"""Benchmark 3, server load: N simulated ranks against one `croupier serve` process.

For N = 64, 256 and 1024 ranks (full scale; 16 and 64 quick), spread over a few client
processes, every rank joins, opens its slice stream and consumes one step every 1/RATE
seconds on a shared clock, acknowledging every ACK_EVERY steps, as a trainer would. We report

- client wait per step (p50, p99): how long a rank was blocked on its stream between
  wanting step t (its clock's time for t, or later if it runs behind) and having its slice.
  Reference: the step interval; the ratio is the fraction of a step spent waiting (the
  target is far below 1: the trainer never waits).
- server CPU per million indices: user+system CPU seconds of the server process (from
  /proc) over the run, per million sample ids delivered. Reference: the CPU the sampling
  core alone spends generating the same batches in this process, so the ratio is the
  serving overhead (gRPC, protobuf, flow control) on top of generation.

Run: python bench/bench_server_load.py [--scale quick|full]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from queue import Empty

import numpy as np

SCALES = {
    "quick": {"ranks": (16, 64), "steps": 30, "rate": 4.0, "procs": 2},
    "full": {"ranks": (64, 256, 1024), "steps": 40, "rate": 2.0, "procs": 4},
}
PER_RANK = 8  # samples per rank per step: global batch = 8 * N
ACK_EVERY = 2
LOOKAHEAD = 8
WARMUP_STEPS = 2
CLUSTERS = 1000


def cluster_sizes() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.pareto(1.1, CLUSTERS) + 1e-3
    return np.floor(w / w.sum() * 4_000_000).astype(np.int64) + 1


def _rank_loop(stub, pb2, rank: int, world: int, steps: int, rate: float, t0: float, out: list,
               retries: list) -> None:
    """One simulated trainer rank; a broken stream or a failed ack is retried, as a client would."""
    import grpc

    stub.Join(pb2.JoinRequest(rank=rank, world_size=world), timeout=300)

    def open_stream(start: int):
        return stub.StreamSlices(pb2.StreamSlicesRequest(rank=rank, world_size=world, start_step=start,
                                                         lookahead=LOOKAHEAD, stop_step=steps))

    stream = open_stream(0)
    have: set[int] = set()
    waits = []
    pending = None
    for t in range(steps):
        due = t0 + t / rate
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        want = time.time()  # a rank running behind its clock (slow start-up) is not charged for that
        while t not in have:
            try:
                resp = next(stream)
            except grpc.RpcError as exc:
                retries.append(f"stream {exc.code().name}")
                stream.cancel()
                stream = open_stream(t)
                continue
            have.update(s.step for s in resp.slices)
        have.discard(t)
        waits.append(time.time() - want)
        if (t + 1) % ACK_EVERY == 0 or t == steps - 1:
            if pending is not None and pending.exception() is not None:
                retries.append(f"ack {pending.exception().code().name}")  # the next ack covers this one
            pending = stub.Ack.future(pb2.AckRequest(rank=rank, world_size=world, next_step=t + 1))
    for attempt in range(5):  # the last ack must land: other ranks' lag bound depends on it
        if pending is not None and pending.exception() is None:
            break
        retries.append(f"ack {pending.exception().code().name}")
        pending = stub.Ack.future(pb2.AckRequest(rank=rank, world_size=world, next_step=steps))
    stream.cancel()
    out.append(waits[WARMUP_STEPS:])


def client_process(address: str, ranks: list[int], world: int, steps: int, rate: float, t0: float, queue) -> None:
    """One client process: one channel, one thread per simulated rank (spawned, never forked)."""
    import grpc

    from croupier.proto import pb2, pb2_grpc
    from croupier.server.grpc_options import channel_options

    channel = grpc.insecure_channel(address, options=channel_options())
    stub = pb2_grpc.SamplerStub(channel)
    results: list = []
    errors: list = []
    retries: list = []

    def run_rank(r: int) -> None:
        try:
            _rank_loop(stub, pb2, r, world, steps, rate, t0, results, retries)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"rank {r}: {exc!r}")

    threads = [threading.Thread(target=run_rank, args=(r,), daemon=True) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    channel.close()
    queue.put({"waits": [w for ws in results for w in ws], "errors": errors[:3], "retries": retries})


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def generation_cpu_per_million(global_batch: int, steps: int) -> float:
    """CPU seconds the sampling core alone needs per million ids at this batch size."""
    from croupier.server.engine import Sampler
    from croupier.server.layout import ClusterLayout
    from croupier.server.policy import PolicyConfig

    s = Sampler(ClusterLayout.from_sizes(cluster_sizes()), PolicyConfig("clusterclip", clip=5), global_batch, 0)
    s.next_batch()
    c0 = time.process_time()
    for _ in range(steps):
        s.next_batch()
    return (time.process_time() - c0) / (steps * global_batch) * 1e6


def one_load(n: int, steps: int, rate: float, procs: int) -> dict:
    world = n
    batch = PER_RANK * n
    with tempfile.TemporaryDirectory() as tmp:
        sizes = ",".join(map(str, cluster_sizes()))
        log_path = os.environ.get("CROUPIER_BENCH_SERVER_LOG")  # keep the server's JSON logs (debugging)
        level = "INFO" if log_path else "WARNING"
        cmd = [sys.executable, "-m", "croupier", "serve", "--cluster-sizes", sizes, "--policy", "clusterclip",
               "--clip", "5", "--global-batch", str(batch), "--state-dir", tmp, "--lookahead", str(LOOKAHEAD),
               "--max-lag", str(2 * LOOKAHEAD), "--max-workers", str(2 * n + 64), "--log-level", level]
        log = open(log_path, "w") if log_path else subprocess.DEVNULL
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            info = json.loads(server.stdout.readline())
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            groups = [list(range(p, n, procs)) for p in range(procs)]
            t0 = time.time() + 3.0 + n / 200  # every rank starts on the same clock, after start-up
            clients = [ctx.Process(target=client_process, args=(info["address"], g, world, steps, rate, t0, queue))
                       for g in groups]
            cpu0 = _cpu_seconds(server.pid)
            for c in clients:
                c.start()
            results = []
            deadline = time.time() + steps / rate + 600
            while len(results) < len(clients):
                try:
                    results.append(queue.get(timeout=1.0))
                except Empty:
                    dead = [c.exitcode for c in clients if c.exitcode not in (None, 0)]
                    if dead or time.time() > deadline:
                        raise RuntimeError(f"client processes failed (exit codes {dead}) or timed out") from None
            cpu = _cpu_seconds(server.pid) - cpu0
            for c in clients:
                c.join(30)
        finally:
            server.terminate()
            server.communicate(timeout=60)
            if log is not subprocess.DEVNULL:
                log.close()
    errors = [e for r in results for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{len(errors)} simulated ranks failed, e.g. {errors[0]}")
    waits = np.asarray([w for r in results for w in r["waits"]])
    ids = n * steps * PER_RANK
    return {"p50_ms": float(np.percentile(waits, 50) * 1e3), "p99_ms": float(np.percentile(waits, 99) * 1e3),
            "cpu_per_m": cpu / ids * 1e6, "batch": batch,
            "retries": Counter(x for r in results for x in r["retries"])}


def run(scale: str = "full") -> list[dict]:
    p = SCALES[scale]
    rows = []
    interval_ms = 1e3 / p["rate"]
    for n in p["ranks"]:
        r = one_load(n, p["steps"], p["rate"], p["procs"])
        ref_cpu = generation_cpu_per_million(r["batch"], max(10, 4000 // n))
        name = f"server load N={n} ranks"
        rows += [
            {"bench": name, "metric": f"client wait per step p50 ({p['rate']:g} steps/s)", "value": r["p50_ms"],
             "unit": "ms", "reference": interval_ms, "ratio": r["p50_ms"] / interval_ms, "target": "<< 1 (x step)"},
            {"bench": name, "metric": "client wait per step p99", "value": r["p99_ms"], "unit": "ms",
             "reference": interval_ms, "ratio": r["p99_ms"] / interval_ms, "target": "< 0.5 (x step)"},
            {"bench": name, "metric": f"server CPU per 1M indices (B={r['batch']})", "value": r["cpu_per_m"],
             "unit": "s", "reference": ref_cpu, "ratio": r["cpu_per_m"] / ref_cpu,
             "target": "(info: x generation alone)"},
            {"bench": name, "metric": "stream reopenings + failed acks", "value": float(sum(r["retries"].values())),
             "unit": "count", "reference": None, "ratio": None,
             "target": ", ".join(f"{k}: {v}" for k, v in r["retries"].most_common(3)) or "(info)"},
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.__main__ import format_table

    print(format_table(run(args.scale)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
