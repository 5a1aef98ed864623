"""Benchmark: a cluster's consumers against one server, directly and through node agents.

Simulated nodes on loopback. Every consumer is one DataLoader worker of one rank (worker w of
W reads the rank's steps t = w mod W), simulated as an asyncio task in a few client
processes (2 cores cannot run thousands of real processes). Each rank consumes one step every
1/RATE s on a shared clock, acknowledging every ACK_EVERY of a worker's steps; like
`RankClient`'s stream thread, a reader task per consumer drains its stream as messages arrive
(bench/common/step_inbox.py), and a consumer's wait is how long after wanting a step its slice
arrived. Two modes run
in the same invocation on the same load:

- direct: every consumer opens its own Session stream to the server (what `RankClient`
  does without an agent);
- agent: one real `croupier agent` process per node; consumers talk to it over ZeroMQ IPC
  and it holds the node's one Session stream.

Per load we report server CPU seconds per million ids delivered (from /proc): over the whole
run (every consumer's Join and lane opening included) and in the steady state (from the end
of the warm-up steps, when every consumer is in: what a long training run pays per step); the
most streams the server had open and its peak threads, and p50 / p99 consumer wait per step;
then the ratios agent / direct. Targets (1,024 ranks x 4 workers): server streams = nodes,
agent/direct CPU <= 0.2, p99 wait agent/direct <= 0.1.

A last part measures the node cache: one agent with a cache limit of 10% of a synthetic MDS
dataset, two ranks reading a clusterclip sequence through it; bytes downloaded against
Belady's offline optimum on the node's merged read sequence (target <= 1.1).

Run: python -m bench.benchmarks.bench_scale [--scale quick|full]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # the repository (bench/benchmarks/ is two below it)
SCALES: dict[str, dict[str, Any]] = {
    # (nodes, ranks per node, workers per rank)
    "quick": {"loads": ((4, 4, 4), (8, 8, 4)), "steps": 40, "rate": 2.0, "procs": 2},
    "full": {"loads": ((8, 8, 4), (32, 8, 4), (64, 16, 4)), "steps": 32, "rate": 2.0, "procs": 4},
}
PER_RANK = 8
ACK_EVERY = 2
LOOKAHEAD = 8
WARMUP = 2
STALL_S = 180.0
STATUS_EVERY_S = 3.0
JOB = "bench"


def _cpu_seconds(pid: int) -> float:
    parts = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


# -- consumers ------------------------------------------------------------------------------------
def _my_steps(worker: int, workers: int, steps: int) -> list[int]:
    return list(range(worker, steps, workers))


async def _consume(inbox, read, ack, worker, workers, steps, rate, t0, out) -> None:
    """A consumer's training loop: wants its steps on the shared clock, waits for those not yet
    in `inbox` (filled by `read`, a background reader task, as RankClient's stream thread does),
    and acknowledges every ACK_EVERY of them with `ack(next_step)`."""
    import asyncio

    reader = asyncio.get_running_loop().create_task(read())
    reader.add_done_callback(lambda task: task.cancelled() or task.exception() is None
                             or inbox.fail(task.exception()))
    try:
        mine = _my_steps(worker, workers, steps)
        for k, t in enumerate(mine):
            delay = t0 + t / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            want = time.time()
            waited = await inbox.wait(t, want)
            if k >= WARMUP:
                out.append(waited)
            if (k + 1) % ACK_EVERY == 0 or k == len(mine) - 1:
                await ack(t + 1)
    finally:
        reader.cancel()


def _steps_of(pb2, resp) -> list[int]:
    for ev in resp.events:
        if ev.error_code:
            raise RuntimeError(f"lane refused: {ev.error_code} {ev.error}")
    return [s.step for ls in resp.lanes for s in ls.slices]


async def _direct_consumer(stub, pb2, rank, world, worker, workers, steps, rate, t0, out) -> None:
    from bench.common.step_inbox import StepInbox

    await stub.Join(pb2.JoinRequest(job=JOB, rank=rank, world_size=world), timeout=300)
    call = stub.Session()
    await call.write(pb2.SessionRequest(job=JOB, open=[pb2.LaneOpen(
        lane=1, rank=rank, world_size=world, start_step=worker, lookahead=LOOKAHEAD, step_stride=workers,
        step_offset=worker, stop_step=steps)]))
    inbox = StepInbox()

    async def read() -> None:
        while True:
            inbox.add(_steps_of(pb2, await call.read()))

    async def ack(next_step: int) -> None:
        await call.write(pb2.SessionRequest(acks=[pb2.LaneAck(lane=1, next_step=next_step)]))

    try:
        await _consume(inbox, read, ack, worker, workers, steps, rate, t0, out)
    finally:
        call.cancel()


async def _agent_consumer(ctx, runtime, pb2, rank, world, worker, workers, steps, rate, t0, out) -> None:
    import zmq

    from bench.common.step_inbox import StepInbox
    from croupier.client.agent.protocol import CALL, SESSION, endpoint

    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint(runtime))
    await sock.send_multipart([CALL, b"1", b"Join", pb2.JoinRequest(job=JOB, rank=rank, world_size=world)
                               .SerializeToString()])
    while True:
        frames = await sock.recv_multipart()
        if frames[0] == b"reply":
            if frames[2]:
                raise RuntimeError(f"join refused: {frames[2]!r} {frames[3][:200]!r}")
            break
    req = pb2.SessionRequest(job=JOB, open=[pb2.LaneOpen(
        lane=1, rank=rank, world_size=world, start_step=worker, lookahead=LOOKAHEAD, step_stride=workers,
        step_offset=worker, stop_step=steps)])
    await sock.send_multipart([SESSION, req.SerializeToString()])
    inbox = StepInbox()

    async def read() -> None:
        while True:
            frames = await sock.recv_multipart()
            if frames[0] == SESSION:
                inbox.add(_steps_of(pb2, pb2.SessionResponse.FromString(frames[2])))

    async def ack(next_step: int) -> None:
        await sock.send_multipart([SESSION, pb2.SessionRequest(acks=[pb2.LaneAck(lane=1, next_step=next_step)])
                                   .SerializeToString()])

    try:
        await _consume(inbox, read, ack, worker, workers, steps, rate, t0, out)
        await sock.send_multipart([SESSION, pb2.SessionRequest(close=[1]).SerializeToString()])
    finally:
        sock.close(0)


def consumer_process(mode: str, address: str, runtimes: list[str], consumers: list[tuple[int, int, int]],
                     world: int, workers: int, steps: int, rate: float, t0: float, queue) -> None:
    """One client process: asyncio tasks for its consumers (node, rank, worker)."""
    import asyncio

    from croupier.proto import pb2

    waits: list[float] = []
    errors: list[str] = []

    async def guard(coro) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            errors.append(repr(exc)[:300])

    async def main() -> None:
        if mode == "direct":
            import grpc

            from croupier.grpc_options import channel_options
            from croupier.proto import pb2_grpc

            # one channel per 64 consumers: a node's workers would not share one connection
            channels = [grpc.aio.insecure_channel(address, options=channel_options())
                        for _ in range(max(1, len(consumers) // 64))]
            stubs = [pb2_grpc.SamplerStub(ch) for ch in channels]
            await asyncio.gather(*(guard(_direct_consumer(stubs[i % len(stubs)], pb2, rank, world, w, workers, steps,
                                                          rate, t0, waits))
                                   for i, (node, rank, w) in enumerate(consumers)))
            for ch in channels:
                await ch.close()
        else:
            import zmq.asyncio

            ctx = zmq.asyncio.Context()
            ctx.set(zmq.MAX_SOCKETS, len(consumers) + 64)  # one DEALER per consumer; the default is 1,023
            await asyncio.gather(*(guard(_agent_consumer(ctx, runtimes[node], pb2, rank, world, w, workers, steps,
                                                         rate, t0, waits))
                                   for node, rank, w in consumers))
            ctx.term()

    asyncio.run(main())
    queue.put({"waits": waits, "errors": errors[:3]})


# -- one load ---------------------------------------------------------------------------------------
def one_load(mode: str, nodes: int, per_node: int, workers: int, steps: int, rate: float, procs: int) -> dict:
    world = nodes * per_node
    batch = PER_RANK * world
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    with tempfile.TemporaryDirectory(prefix="cr-bench-") as tmp:
        sizes = ",".join(str(1000 + 37 * k) for k in range(200))
        server = subprocess.Popen(
            [sys.executable, "-m", "croupier", "serve", "--cluster-sizes", sizes, "--policy", "clusterclip",
             "--clip", "5", "--global-batch", str(batch), "--state-dir", f"{tmp}/state", "--lookahead",
             str(LOOKAHEAD), "--max-lag", str(2 * LOOKAHEAD), "--job", JOB, "--log-level", "WARNING",
             "--rank-timeout", "600"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        agents: list[subprocess.Popen] = []
        clients: list = []
        peak = {"threads": 0, "streams": 0}
        sampling = threading.Event()
        try:
            info = json.loads(server.stdout.readline())
            runtimes = [f"{tmp}/n{k}" for k in range(nodes)]
            if mode == "agent":
                for k in range(nodes):
                    agents.append(subprocess.Popen(
                        [sys.executable, "-m", "croupier", "agent", "--server", info["address"], "--runtime-dir",
                         runtimes[k], "--cache-dir", f"{tmp}/c{k}", "--node", f"node{k}", "--local-ranks",
                         str(per_node), "--log-level", "WARNING"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
                deadline = time.time() + 300
                while not all(Path(r, "agent.sock").exists() for r in runtimes):
                    if time.time() > deadline:
                        raise RuntimeError("agents did not start")
                    time.sleep(0.2)

            def sample() -> None:
                import grpc

                from croupier.proto import pb2, pb2_grpc

                # threads from /proc twice a second; the server's status (a call the server pays
                # for, listing every rank and session) every STATUS_EVERY_S only
                with grpc.insecure_channel(info["address"]) as ch:
                    stub = pb2_grpc.SamplerStub(ch)
                    asked = 0.0
                    while not sampling.wait(0.5):
                        try:
                            peak["threads"] = max(peak["threads"], _threads(server.pid))
                            if time.monotonic() - asked >= STATUS_EVERY_S:
                                asked = time.monotonic()
                                st = stub.GetStatus(pb2.GetStatusRequest(), timeout=10)
                                peak["streams"] = max(peak["streams"], st.open_streams)
                        except Exception:  # noqa: BLE001 - a missed sample is no result
                            pass

            all_consumers = [(k, k * per_node + r, w) for k in range(nodes) for r in range(per_node)
                             for w in range(workers)]
            groups = [all_consumers[p::procs] for p in range(procs)]
            t0 = time.time() + 5.0 + len(all_consumers) / 150
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            clients = [ctx.Process(target=consumer_process, args=(mode, info["address"], runtimes, g, world, workers,
                                                                    steps, rate, t0, queue)) for g in groups]
            cpu0 = _cpu_seconds(server.pid)
            warm: dict[str, float] = {}

            def mark_warm() -> None:  # the server's CPU once every consumer joined and opened its lane
                delay = t0 + WARMUP / rate - time.time()
                if delay > 0:
                    time.sleep(delay)
                warm["cpu"] = _cpu_seconds(server.pid)

            threading.Thread(target=sample, daemon=True).start()
            threading.Thread(target=mark_warm, daemon=True).start()
            for c in clients:
                c.start()
            results = []
            deadline = t0 + steps / rate + STALL_S
            while len(results) < len(clients):
                try:
                    results.append(queue.get(timeout=1.0))
                except Empty:
                    if time.time() > deadline:
                        raise RuntimeError("stalled") from None
                    if any(c.exitcode not in (None, 0) for c in clients):
                        raise RuntimeError("a client process failed") from None
            cpu_end = _cpu_seconds(server.pid)
            cpu = cpu_end - cpu0
            steady = cpu_end - warm.get("cpu", cpu0)
            for c in clients:
                c.join(30)
        finally:
            sampling.set()
            for c in clients:
                if c.is_alive():
                    c.kill()
            for a in agents:
                a.send_signal(signal.SIGTERM)
            for a in agents:
                try:
                    a.wait(30)
                except subprocess.TimeoutExpired:
                    a.kill()
            server.terminate()
            server.communicate(timeout=60)
    errors = [e for r in results for e in r["errors"]]
    if errors:
        raise RuntimeError(f"{len(errors)} consumers failed, e.g. {errors[0]}")
    waits = np.asarray([w for r in results for w in r["waits"]])
    ids = steps * batch
    return {"p50_ms": float(np.percentile(waits, 50) * 1e3), "p99_ms": float(np.percentile(waits, 99) * 1e3),
            "cpu_per_m": cpu / ids * 1e6, "steady_per_m": steady / ((steps - WARMUP) * batch) * 1e6,
            "streams": peak["streams"], "threads": peak["threads"]}


# -- node cache --------------------------------------------------------------------------------------
def _test_folders(*files: str) -> list[Path]:
    """The folders to put on sys.path to import each of `files` (paths relative to an import
    root, e.g. "workers/harness.py") from the test suite, wherever under tests/ it sits."""
    out: list[Path] = []
    for rel in files:
        found = sorted(ROOT.glob(f"tests/**/{rel}"))
        if not found:
            raise FileNotFoundError(f"no tests/**/{rel} under {ROOT}")
        out.append(found[0].parents[rel.count("/")])
    return out


def cache_part() -> dict:
    """Bytes a node downloads under a 10% cache limit, against Belady's offline optimum."""
    for folder in _test_folders("test_agent.py", "workers/harness.py"):
        sys.path.insert(0, str(folder))
    from test_agent import belady_bytes  # the same optimum the tests assert against

    from croupier.client.dataset import CroupierIterableDataset
    from croupier.format.fingerprint import index_fingerprint
    from croupier.format.mds_index import MDSIndex
    from croupier.layout import ClusterLayout
    from croupier.server.job.job import Job, JobSpec
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.sampling.sampler import Sampler
    from croupier.server.serving.service import create_server
    from croupier.topology import Topology
    from workers.harness import cluster_sizes, write_mds

    n, steps, batch = 6000, 100, 8
    with tempfile.TemporaryDirectory(prefix="cr-bench-") as tmp:
        remote = write_mds(Path(tmp) / "ds", n, size_limit=1 << 11)
        raw = (remote / "index.json").read_bytes()
        index = MDSIndex(raw, where="bench")
        sizes = np.array([e.raw.bytes for e in index.shards], dtype=np.int64)
        limit = max(int(sizes.sum() * 0.10), int(sizes.max()))
        csizes = cluster_sizes(n, 16)
        config = PolicyConfig(policy="clusterclip", clip=3)
        job = Job(ClusterLayout.from_sizes(csizes), config, batch, 1,
                  spec=JobSpec(name=JOB, dataset_remote=str(remote), dataset_fingerprint=index_fingerprint(raw)))
        server, port = create_server(job, "127.0.0.1:0")
        runtime = f"{tmp}/n0"
        agent = subprocess.Popen([sys.executable, "-m", "croupier", "agent", "--server", f"127.0.0.1:{port}",
                                  "--runtime-dir", runtime, "--cache-dir", f"{tmp}/c0", "--cache-limit", str(limit),
                                  "--log-level", "WARNING"], stderr=subprocess.DEVNULL)
        try:
            while not Path(runtime, "agent.sock").exists():
                time.sleep(0.1)

            def run(rank: int) -> None:
                ds = CroupierIterableDataset("agent", JOB, topology=Topology(rank, 2), steps=steps, start_step=0,
                                             lookahead=4, agent=runtime)
                for _ in ds.iter_steps():
                    pass

            threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            agent.send_signal(signal.SIGTERM)
            agent.wait(60)
            stats = json.loads(Path(runtime, "stats.json").read_text())
        finally:
            if agent.poll() is None:
                agent.kill()
            server.stop(0, checkpoint=False)
        s = Sampler(ClusterLayout.from_sizes(csizes), config, batch, seed=1)
        seq = [int(x) for _ in range(steps) for x in index.table.shard_of(s.next_batch()).tolist()]
        optimum = belady_bytes(seq, sizes, limit)
    return {"downloaded": stats["bytes_downloaded"], "optimum": optimum, "limit": limit,
            "dataset": int(sizes.sum()), "hits": stats["cache_hits"], "misses": stats["cache_misses"]}


# (load, metric, direct's value: the reference, agent's value, agent / direct, target), per row
Row = tuple[str, str, float | None, float | None, float | None, str]
_METRICS = (("cpu_per_m", "server CPU per 1M ids", "s", "(joins included)"),
            ("steady_per_m", "server CPU per 1M ids, steady", "s", "<= 0.2"),
            ("p99_ms", "consumer wait p99", "ms", "<= 0.1 (at 1,024 ranks x 4)"),
            ("p50_ms", "consumer wait p50", "ms", "(info)"),
            ("streams", "server open streams (peak)", "", "agent = {nodes} nodes"),
            ("threads", "server threads (peak)", "", "(info)"))
_UNITS = {what: unit for _, what, unit, _ in _METRICS} | {"bytes downloaded vs Belady optimum": "bytes"}


def measure(scale: str, skip_cache: bool = False) -> list[Row]:
    """Every load of the scale, direct then agent, and (unless `skip_cache`) the node cache."""
    p = SCALES[scale]
    rows: list[Row] = []
    for nodes, per_node, workers in p["loads"]:
        label = f"{nodes} nodes x {per_node} ranks x {workers} workers = {nodes * per_node * workers} consumers"
        res: dict[str, dict | None] = {}
        for mode in ("direct", "agent"):
            try:
                res[mode] = r = one_load(mode, nodes, per_node, workers, p["steps"], p["rate"], p["procs"])
            except RuntimeError as exc:
                res[mode] = None
                print(f"[bench_scale] {label} {mode}: FAILED {exc}", file=sys.stderr, flush=True)
                continue
            print(f"[bench_scale] {label} {mode}: p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms, server CPU "
                  f"{r['cpu_per_m']:.1f} s/1M ids ({r['steady_per_m']:.1f} after warm-up), streams {r['streams']}, "
                  f"threads {r['threads']}",
                  file=sys.stderr, flush=True)
        d, a = res.get("direct"), res.get("agent")
        for key, what, _, target in _METRICS:
            dv = d[key] if d else None
            av = a[key] if a else None
            ratio = av / dv if dv and av is not None else None
            rows.append((label, what, dv, av, ratio, target.format(nodes=nodes)))
    if not skip_cache:
        c = cache_part()
        rows.append(("1 node, cache limit 10% of the dataset", "bytes downloaded vs Belady optimum",
                     c["optimum"], c["downloaded"], c["downloaded"] / c["optimum"], "<= 1.1"))
    return rows


def run(scale: str = "full") -> list[dict]:
    """Runner entry point (`python -m bench`): per load and metric, agent's value against
    direct's in the same run (the reference), and the node cache's bytes against Belady's."""
    return [{"bench": f"scale: {label}", "metric": what, "value": av, "unit": _UNITS.get(what, ""),
             "reference": dv, "ratio": ratio, "target": target} for label, what, dv, av, ratio, target in measure(scale)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--skip-cache", action="store_true", help="skip the node cache part")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = measure(args.scale, args.skip_cache)

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    print(f"{'load':<62} {'metric':<30} {'direct/ref':>12} {'agent':>12} {'ratio':>7}  target")
    for label, what, dv, av, ratio, target in rows:
        print(f"{label:<62} {what:<30} {fmt(dv):>12} {fmt(av):>12} "
              f"{('-' if ratio is None else f'{ratio:.3f}'):>7}  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
