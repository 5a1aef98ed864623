"""Benchmark 3, server load: N simulated ranks against one `croupier serve` process.

For N = 64, 256 and 1024 ranks (full scale; 16 and 64 quick), spread as asyncio tasks over a
few client processes (so the client side does not dominate the cores), every rank joins,
opens its Session stream (one lane; a server without Session: StreamSlices plus unary Ack)
and consumes one step every 1/RATE seconds on a shared clock, acknowledging every ACK_EVERY
steps in-band, as `RankClient` does. Like `RankClient`'s stream thread, a reader task per rank
drains its stream as messages arrive (bench/common/step_inbox.py). We report

- client wait per step (p50, p99): how long after wanting step t (its clock's time for t, or
  later if it runs behind) a rank's slice of t arrived; zero when it was already there.
  Reference: the step interval; the ratio is the fraction of a step spent waiting (the
  target is far below 1: the trainer never waits).
- server CPU per million indices: user+system CPU seconds of the server process (from
  /proc) over the run, per million sample ids delivered. Reference: the CPU the sampling
  core alone spends generating the same batches in this process, so the ratio is the
  serving overhead (gRPC, protobuf, flow control) on top of generation.
- server threads and RSS (the most seen while the ranks ran), and stream reopenings plus
  failed (e.g. CANCELLED) acknowledgements.

With `--baseline REV` the same loads (parameters frozen in SCALES) run, in the same
invocation, against the server of git revision REV too (checked out into a temporary
`git worktree` under /tmp, removed afterwards), and each metric's ratio new/old is printed.

Every load also runs against the transport floor (bench/common/floor_server.py): a Session server
that sends the ranks exactly the messages croupier's server sends and does nothing else. Its
CPU per million ids is what Python grpc.aio alone costs for this message pattern; new/floor
is what croupier's job adds on top, floor/old the least any server could reach against the
baseline with these messages.

Run: python -m bench.benchmarks.bench_server_load [--scale quick|full] [--baseline main]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from queue import Empty

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository (bench/benchmarks/ is two below it)
SCALES = {
    "quick": {"ranks": (16, 64), "steps": 30, "rate": 4.0, "procs": 2},
    "full": {"ranks": (64, 256, 1024), "steps": 40, "rate": 2.0, "procs": 4},
}
PER_RANK = 8  # samples per rank per step: global batch = 8 * N
ACK_EVERY = 2
LOOKAHEAD = 8
WARMUP_STEPS = 2
STALL_S = 120.0  # a load whose ranks are not done this long after their last step was due has stalled
CLUSTERS = 1000


def cluster_sizes() -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.pareto(1.1, CLUSTERS) + 1e-3
    return np.floor(w / w.sum() * 4_000_000).astype(np.int64) + 1


async def _rank_loop(stub, pb2, rank: int, world: int, steps: int, rate: float, t0: float, out: list,
                     retries: list) -> None:
    """One simulated trainer rank on StreamSlices plus unary Ack (a server without Session); a
    broken stream or a failed ack is retried, as a client would."""
    import asyncio

    import grpc

    from bench.common.step_inbox import StepInbox

    await stub.Join(pb2.JoinRequest(rank=rank, world_size=world), timeout=300)

    def open_stream(start: int):
        return stub.StreamSlices(pb2.StreamSlicesRequest(rank=rank, world_size=world, start_step=start,
                                                         lookahead=LOOKAHEAD, stop_step=steps, packed_ids=True))

    async def ack(next_step: int) -> None:
        for _ in range(5):
            try:
                await stub.Ack(pb2.AckRequest(rank=rank, world_size=world, next_step=next_step), timeout=30)
                return
            except grpc.aio.AioRpcError as exc:
                retries.append(f"ack {exc.code().name}")

    inbox = StepInbox()
    pos = {"next": 0, "stream": open_stream(0)}

    async def read() -> None:
        while True:
            stream = pos["stream"]
            try:
                resp = await stream.read()
            except grpc.aio.AioRpcError as exc:
                retries.append(f"stream {exc.code().name}")
                stream.cancel()
                pos["stream"] = open_stream(pos["next"])
                continue
            if resp is grpc.aio.EOF:
                if all(t in inbox.arrived for t in range(pos["next"], steps)):
                    return  # the stream ended at stop_step with every step delivered
                retries.append("stream EOF")
                pos["stream"] = open_stream(pos["next"])
                continue
            inbox.add(s.step for s in resp.slices)

    reader = asyncio.get_running_loop().create_task(read())
    waits = []
    acks = []
    try:
        for t in range(steps):
            delay = t0 + t / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            want = time.time()  # a rank running behind its clock (slow start-up) is not charged for that
            waits.append(await inbox.wait(t, want))
            pos["next"] = t + 1
            if (t + 1) % ACK_EVERY == 0 or t == steps - 1:
                acks.append(asyncio.ensure_future(ack(t + 1)))
        await asyncio.gather(*acks)
    finally:
        reader.cancel()
        pos["stream"].cancel()
    out.append(waits[WARMUP_STEPS:])


async def _session_rank_loop(stub, pb2, rank: int, world: int, steps: int, rate: float, t0: float, out: list,
                             retries: list) -> None:
    """One simulated trainer rank on a Session stream (what RankClient uses): acknowledgements
    travel in-band; a broken stream is re-opened from the next step with the position."""
    import asyncio

    import grpc

    from bench.common.step_inbox import StepInbox

    await stub.Join(pb2.JoinRequest(rank=rank, world_size=world), timeout=300)

    async def open_session(start: int, acked: int):
        call = stub.Session()
        req = pb2.SessionRequest(open=[pb2.LaneOpen(lane=1, rank=rank, world_size=world, start_step=start,
                                                    lookahead=LOOKAHEAD, stop_step=steps)])
        if acked:
            req.acks.add(lane=1, next_step=acked)
        await call.write(req)
        return call

    inbox = StepInbox()
    pos = {"next": 0, "acked": 0, "call": await open_session(0, 0)}

    async def read() -> None:
        while True:
            call = pos["call"]
            try:
                resp = await call.read()
            except grpc.aio.AioRpcError as exc:
                retries.append(f"stream {exc.code().name}")
                call.cancel()
                pos["call"] = await open_session(pos["next"], pos["acked"])
                continue
            if resp is grpc.aio.EOF:
                retries.append("stream EOF")
                pos["call"] = await open_session(pos["next"], pos["acked"])
                continue
            for ev in resp.events:
                if ev.error_code:
                    retries.append(f"lane {ev.error_code}")
            inbox.add(s.step for ls in resp.lanes for s in ls.slices)

    reader = asyncio.get_running_loop().create_task(read())
    waits = []
    try:
        for t in range(steps):
            delay = t0 + t / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            want = time.time()
            waits.append(await inbox.wait(t, want))
            pos["next"] = t + 1
            if (t + 1) % ACK_EVERY == 0 or t == steps - 1:
                pos["acked"] = t + 1
                try:
                    await pos["call"].write(pb2.SessionRequest(acks=[pb2.LaneAck(lane=1, next_step=t + 1)]))
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                    retries.append(f"ack {type(exc).__name__}")
    finally:
        reader.cancel()
        pos["call"].cancel()
    out.append(waits[WARMUP_STEPS:])


def client_process(address: str, ranks: list[int], world: int, steps: int, rate: float, t0: float, queue,
                   protocol: str = "session") -> None:
    """One client process: one asyncio channel, one task per simulated rank (spawned, never forked)."""
    import asyncio

    import grpc

    from croupier.grpc_options import channel_options
    from croupier.proto import pb2, pb2_grpc

    results: list = []
    errors: list = []
    retries: list = []

    async def run_rank(stub, r: int) -> None:
        try:
            loop = _session_rank_loop if protocol == "session" else _rank_loop
            await loop(stub, pb2, r, world, steps, rate, t0, results, retries)
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(f"rank {r}: {exc!r}")

    async def main() -> None:
        async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
            stub = pb2_grpc.SamplerStub(channel)
            await asyncio.gather(*(run_rank(stub, r) for r in ranks))

    asyncio.run(main())
    queue.put({"waits": [w for ws in results for w in ws], "errors": errors[:3], "retries": retries})


def _threads_rss(pid: int) -> tuple[int, float]:
    threads, rss = 0, 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    return threads, rss


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def generation_cpu_per_million(global_batch: int, steps: int) -> float:
    """CPU seconds the sampling core alone needs per million ids at this batch size."""
    from croupier.layout import ClusterLayout
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.sampler import Sampler

    s = Sampler(ClusterLayout.from_sizes(cluster_sizes()), PolicyConfig("clusterclip", clip=5), global_batch, 0)
    s.next_batch()
    c0 = time.process_time()
    for _ in range(steps):
        s.next_batch()
    return (time.process_time() - c0) / (steps * global_batch) * 1e6


def one_load(n: int, steps: int, rate: float, procs: int, env: dict[str, str] | None = None,
             cwd: Path | None = None, protocol: str = "session", floor: bool = False) -> dict:
    """One load of n ranks against a fresh `croupier serve` (or, with `floor`, against the
    transport floor server of bench/common/floor_server.py)."""
    world = n
    batch = PER_RANK * n
    with tempfile.TemporaryDirectory() as tmp:
        sizes = ",".join(map(str, cluster_sizes()))
        log_path = os.environ.get("CROUPIER_BENCH_SERVER_LOG")  # keep the server's JSON logs (debugging)
        level = "INFO" if log_path else "WARNING"
        cmd = [sys.executable, "-m", "croupier", "serve", "--cluster-sizes", sizes, "--policy", "clusterclip",
               "--clip", "5", "--global-batch", str(batch), "--state-dir", tmp, "--lookahead", str(LOOKAHEAD),
               "--max-lag", str(2 * LOOKAHEAD), "--max-workers", str(2 * n + 64), "--log-level", level]
        if floor:
            cmd, cwd = [sys.executable, "-m", "bench.common.floor_server"], ROOT
        log = open(log_path, "w") if log_path else subprocess.DEVNULL
        server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
                                  cwd=cwd)
        peak = {"threads": 0, "rss_mb": 0.0}
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                try:
                    th, rss = _threads_rss(server.pid)
                except OSError:
                    return
                peak["threads"], peak["rss_mb"] = max(peak["threads"], th), max(peak["rss_mb"], rss)

        sampler = threading.Thread(target=sample, daemon=True)
        clients: list = []
        try:
            info = json.loads(server.stdout.readline())
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            groups = [list(range(p, n, procs)) for p in range(procs)]
            t0 = time.time() + 3.0 + n / 200  # every rank starts on the same clock, after start-up
            clients = [ctx.Process(target=client_process, args=(info["address"], g, world, steps, rate, t0, queue, protocol))
                       for g in groups]
            cpu0 = _cpu_seconds(server.pid)
            sampler.start()
            for c in clients:
                c.start()
            results = []
            deadline = t0 + steps / rate + STALL_S
            while len(results) < len(clients):
                try:
                    results.append(queue.get(timeout=1.0))
                except Empty:
                    dead = [c.exitcode for c in clients if c.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"client processes failed (exit codes {dead})") from None
                    if time.time() > deadline:
                        raise RuntimeError(f"stalled: the ranks had not finished {STALL_S:.0f} s after their "
                                           "last step was due") from None
            cpu = _cpu_seconds(server.pid) - cpu0
            sampling.set()
            for c in clients:
                c.join(30)
        except BaseException:
            for c in clients:
                if c.is_alive():
                    c.kill()
            raise
        finally:
            sampling.set()
            server.terminate()
            try:
                server.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.communicate()
            if log is not subprocess.DEVNULL:
                log.close()
    errors = [e for r in results for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{len(errors)} simulated ranks failed, e.g. {errors[0]}")
    waits = np.asarray([w for r in results for w in r["waits"]])
    ids = n * steps * PER_RANK
    return {"p50_ms": float(np.percentile(waits, 50) * 1e3), "p99_ms": float(np.percentile(waits, 99) * 1e3),
            "cpu_per_m": cpu / ids * 1e6, "batch": batch, "threads": peak["threads"], "rss_mb": peak["rss_mb"],
            "retries": Counter(x for r in results for x in r["retries"])}


def _rows(n: int, r: dict, p: dict, ref_cpu: float, label: str) -> list[dict]:
    interval_ms = 1e3 / p["rate"]
    name = f"server load N={n} ranks{label}"
    return [
        {"bench": name, "metric": f"client wait per step p50 ({p['rate']:g} steps/s)", "value": r["p50_ms"],
         "unit": "ms", "reference": interval_ms, "ratio": r["p50_ms"] / interval_ms, "target": "<< 1 (x step)"},
        {"bench": name, "metric": "client wait per step p99", "value": r["p99_ms"], "unit": "ms",
         "reference": interval_ms, "ratio": r["p99_ms"] / interval_ms, "target": "< 0.5 (x step)"},
        {"bench": name, "metric": f"server CPU per 1M indices (B={r['batch']})", "value": r["cpu_per_m"],
         "unit": "s", "reference": ref_cpu, "ratio": r["cpu_per_m"] / ref_cpu,
         "target": "(info: x generation alone)"},
        {"bench": name, "metric": "server threads (peak)", "value": float(r["threads"]), "unit": "count",
         "reference": None, "ratio": None, "target": "< 64"},
        {"bench": name, "metric": "server RSS (peak)", "value": r["rss_mb"], "unit": "MiB",
         "reference": None, "ratio": None, "target": "(info)"},
        {"bench": name, "metric": "stream reopenings + failed acks", "value": float(sum(r["retries"].values())),
         "unit": "count", "reference": None, "ratio": None,
         "target": ", ".join(f"{k}: {v}" for k, v in r["retries"].most_common(3)) or "0"},
    ]


_COMPARED = (("p99_ms", "client wait p99", "<= 0.1"), ("p50_ms", "client wait p50", "(info)"),
             ("cpu_per_m", "server CPU per 1M indices", "<= 0.2"), ("threads", "server threads", "(info)"),
             ("rss_mb", "server RSS", "(info)"))


def _baseline_env(rev: str, tmp: Path) -> tuple[dict[str, str], Path]:
    """An environment whose `python -m croupier` is the croupier of git revision `rev`: a
    temporary worktree and a package folder of links mirroring pyproject's package-dir."""
    tree = tmp / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    pkg = tmp / "pkg" / "croupier"
    pkg.mkdir(parents=True)
    for f in (tree / "croupier").iterdir():
        (pkg / f.name).symlink_to(f)
    for sub in ("proto", "server", "client", "shards"):
        (pkg / sub).symlink_to(tree / sub)
    env = dict(os.environ, PYTHONPATH=str(tmp / "pkg"))  # run with cwd=tmp/pkg: `-m` puts the cwd first
    return env, tree


def _progress(rows: list[dict]) -> None:
    for r in rows:
        print(f"[bench_server_load] {r['bench']}: {r['metric']} = {r['value']} {r['unit']} {r.get('target') or ''}",
              file=sys.stderr, flush=True)


def run(scale: str = "full", baseline: str | None = None) -> list[dict]:
    p = SCALES[scale]
    rows = []
    base_tmp = Path(tempfile.mkdtemp(prefix="croupier-bench-baseline-")) if baseline else None
    tree = None
    try:
        base_env = None
        if baseline:
            base_env, tree = _baseline_env(baseline, base_tmp)
            has_session = "rpc Session(" in (tree / "proto" / "croupier" / "v1" / "croupier.proto").read_text()
            base_protocol = "session" if has_session else "streams"
        for n in p["ranks"]:
            r = one_load(n, p["steps"], p["rate"], p["procs"])
            ref_cpu = generation_cpu_per_million(r["batch"], max(10, 4000 // n))
            rows += _rows(n, r, p, ref_cpu, "")
            _progress(rows[-6:])
            fl = one_load(n, p["steps"], p["rate"], p["procs"], floor=True)
            rows.append({"bench": f"server load N={n} ranks [transport floor]", "metric": "server CPU per 1M indices",
                         "value": fl["cpu_per_m"], "unit": "s", "reference": None, "ratio": None,
                         "target": "(info: a Session server that only moves the same messages)"})
            rows.append({"bench": f"server load N={n} ranks: new / transport floor", "metric": "server CPU per 1M indices",
                         "value": r["cpu_per_m"], "unit": "", "reference": fl["cpu_per_m"],
                         "ratio": r["cpu_per_m"] / fl["cpu_per_m"] if fl["cpu_per_m"] else None, "target": "(info)"})
            _progress(rows[-2:])
            if base_env is None:
                continue
            try:
                old = one_load(n, p["steps"], p["rate"], p["procs"], env=base_env, cwd=base_tmp / "pkg",
                               protocol=base_protocol)
            except RuntimeError as exc:  # the old server may stall or fail: that is a result too
                rows.append({"bench": f"server load N={n} ranks [{baseline}]", "metric": "FAILED", "value": None,
                             "unit": "", "reference": None, "ratio": None, "target": str(exc)[:100]})
                _progress(rows[-1:])
                continue
            rows += _rows(n, old, p, ref_cpu, f" [{baseline}]")
            rows.append({"bench": f"server load N={n} ranks: transport floor / {baseline}",
                         "metric": "server CPU per 1M indices", "value": fl["cpu_per_m"], "unit": "",
                         "reference": old["cpu_per_m"], "ratio": fl["cpu_per_m"] / old["cpu_per_m"] if old["cpu_per_m"]
                         else None, "target": "(info: the least any server could reach with these messages)"})
            _progress(rows[-7:])
            for key, what, target in _COMPARED:
                rows.append({"bench": f"server load N={n} ranks: new / {baseline}", "metric": what,
                             "value": r[key], "unit": "", "reference": old[key],
                             "ratio": r[key] / old[key] if old[key] else None, "target": target})
    finally:
        if tree is not None:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                           capture_output=True)
        if base_tmp is not None:
            shutil.rmtree(base_tmp, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--baseline", default=None, help="git revision whose server runs the same loads (ratios)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from bench.common.table import format_table

    print(format_table(run(args.scale, args.baseline)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
