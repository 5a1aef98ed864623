"""The node agent: real `croupier agent` processes over ZeroMQ IPC, a real server, real shards.

Each test compares what the consumers receive through their node's agent with an in-process
`Sampler` run (the one global sequence), and reads the server's status and the agents' own
reports for what the server and the nodes saw.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from croupier.client.agent.protocol import INFO_NAME, socket_path
from croupier.client.dataset import CroupierIterableDataset
from croupier.client.rank_client import Backoff, RankClient
from croupier.errors import ConfigError
from croupier.format.fingerprint import index_fingerprint
from croupier.layout import ClusterLayout
from croupier.proto import pb2
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.serving.service import create_server
from croupier.topology import Topology
from workers.harness import (
    CROUPIER,
    REPO,
    cluster_sizes,
    env_for_subprocess,
    free_port,
    kill_tree,
    sample_text,
    wait_for,
    write_mds,
)

N = 240
SIZES = cluster_sizes(N, 8)
B = 8
SEED = 5
CONFIG = PolicyConfig(policy="clusterclip", clip=3)
JOB = "agentjob"

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
STOP_BOUND_S = 30.0
"""How long a SIGTERMed agent may take to exit in these tests (correctness, not speed)."""


def reference(steps: int, sizes=SIZES) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(sizes), CONFIG, B, seed=SEED)
    return [s.next_batch() for _ in range(steps)]


@pytest.fixture(scope="module")
def mds(tmp_path_factory) -> Path:
    return write_mds(tmp_path_factory.mktemp("mds") / "ds", N)


class Cluster:
    """An in-process server and `croupier agent` processes (one per simulated node)."""

    def __init__(self, tmp: Path, remote: Path) -> None:
        self.tmp = tmp
        self.remote = remote
        self.server = None
        self.address = ""
        self.agents: dict[int, subprocess.Popen] = {}
        self.procs: list[subprocess.Popen] = []

    def start_server(self, port: int = 0, lookahead: int = 8, sizes=SIZES):
        fp = index_fingerprint((self.remote / "index.json").read_bytes())
        spec = JobSpec(name=JOB, dataset_remote=str(self.remote), dataset_fingerprint=fp, max_lookahead=lookahead)
        job = Job(ClusterLayout.from_sizes(sizes), CONFIG, B, SEED, spec=spec, store=CheckpointStore(self.tmp / "state"))
        self.server, bound = create_server(job, f"127.0.0.1:{port}", max_workers=4)
        self.address = f"127.0.0.1:{bound}"
        return self.server

    def runtime(self, node: int) -> Path:
        return self.tmp / f"n{node}" / "run"

    def cache(self, node: int) -> Path:
        return self.tmp / f"n{node}" / "cache"

    def start_agent(self, node: int, *extra: str, wait: bool = True) -> subprocess.Popen:
        with open(self.tmp / f"agent{node}.log", "ab") as log:
            proc = subprocess.Popen(
                [CROUPIER, "agent", "--server", self.address, "--runtime-dir", str(self.runtime(node)),
                 "--cache-dir", str(self.cache(node)), "--node", f"node{node}", *extra],
                stdout=log, stderr=subprocess.STDOUT, env=env_for_subprocess(), start_new_session=True)
        self.procs.append(proc)
        if wait:
            self.agents[node] = proc
            wait_for(lambda: socket_path(self.runtime(node)).exists() and (self.runtime(node) / INFO_NAME).exists()
                     and json.loads((self.runtime(node) / INFO_NAME).read_text())["pid"] == proc.pid,
                     30, f"agent of node {node}")
        return proc

    def report(self, node: int) -> pb2.NodeReport:
        st = self.status()
        for s in st.sessions:
            if s.node.node == f"node{node}":
                return s.node
        raise AssertionError(f"no session of node{node} in status")

    def status(self) -> pb2.GetStatusResponse:
        from croupier.server.serving.service import status_response

        srv = self.server
        resp = status_response(srv.job, srv.job.status(), include_clusters=False)
        resp.sessions.extend(s.status() for s in list(srv.servicer.sessions.values()))
        return resp

    def stop(self) -> None:
        for p in self.procs:
            kill_tree(p, signal.SIGTERM)
        if self.server is not None:
            self.server.stop(0, checkpoint=False)


@pytest.fixture
def cluster(tmp_path, mds):
    c = Cluster(tmp_path, mds)
    yield c
    c.stop()


def start_serve(cmd: list[str], log: Path) -> subprocess.Popen:
    """A `croupier serve` process (stderr appended to `log`), once it printed its serving line."""
    with open(log, "ab") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env_for_subprocess(), start_new_session=True)
    try:
        assert p.stdout is not None and p.stdout.readline(), log.read_text()[-3000:]
    except BaseException:
        stop_serve(p)
        raise
    return p


def stop_serve(p: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Ends a `start_serve` process (its group, with `sig`, if it still runs) and closes its pipe."""
    kill_tree(p, sig)
    if p.stdout is not None:
        p.stdout.close()


def client(cluster: Cluster, node: int, rank: int, world: int, **kw) -> RankClient:
    kw.setdefault("backoff", Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=60))
    return RankClient("agent", job=JOB, topology=Topology(rank, world), agent=str(cluster.runtime(node)), **kw)


def run_ranks(cluster: Cluster, nodes: int, per_node: int, steps: int, **kw) -> dict[int, dict[int, np.ndarray]]:
    world = nodes * per_node
    got: dict[int, dict[int, np.ndarray]] = {r: {} for r in range(world)}
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            with client(cluster, rank // per_node, rank, world, stop_step=steps, lookahead=4, **kw) as c:
                for step, ids in c:
                    got[rank][step] = np.array(ids)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    return got


def check_union(got: dict[int, dict[int, np.ndarray]], steps: int) -> None:
    ref = reference(steps)
    world = len(got)
    for r in range(world):
        assert sorted(got[r]) == list(range(steps)), r
    for step in range(steps):
        np.testing.assert_array_equal(np.concatenate([got[r][step] for r in range(world)]), ref[step])


def test_ranks_through_agents_get_the_sequence_on_one_stream_per_node(cluster, capsys) -> None:
    cluster.start_server()
    for node in range(2):
        cluster.start_agent(node)
    got = run_ranks(cluster, nodes=2, per_node=2, steps=30)
    check_union(got, 30)
    # `croupier status` shows the nodes (their agents' sessions stay open between jobs' runs).
    from prometheus_client import generate_latest

    from croupier.cli import main as cli_main
    from croupier.server.serving.metrics import ServerMetrics

    assert cli_main(["status", "--server", cluster.address, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert sorted(x["node"] for x in st["sessions"]) == ["node0", "node1"] and st["open_streams"] == 2
    assert cli_main(["status", "--server", cluster.address]) == 0
    table = capsys.readouterr().out
    assert "sessions 2" in table and "node0" in table and "node1" in table
    metrics = ServerMetrics(cluster.server.job)
    metrics.attach_sessions(cluster.server.servicer)
    text = generate_latest(metrics.registry).decode()
    assert "croupier_open_sessions 2.0" in text and 'croupier_node_cache_hit_ratio{node="node0"}' in text


def test_missing_or_foreign_agent_socket_is_refused_naming_the_path(cluster, tmp_path) -> None:
    cluster.start_server()
    with pytest.raises(ConfigError, match=str(tmp_path / "nowhere")):
        RankClient("agent", job=JOB, topology=Topology(0, 1), agent=str(tmp_path / "nowhere")).join()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "agent.sock").write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        RankClient("agent", job=JOB, topology=Topology(0, 1), agent=str(foreign)).join()


def test_two_agents_on_one_runtime_dir_refuse_each_other(cluster) -> None:
    cluster.start_server()
    cluster.start_agent(0)
    second = cluster.start_agent(0, wait=False)
    assert second.wait(30) == 2
    assert "already serves the runtime directory" in (cluster.tmp / "agent0.log").read_text()
    assert cluster.agents[0].poll() is None  # the first one keeps serving


def read_records(out: Path) -> list[dict]:
    recs = []
    for path in sorted(out.glob("records.rank*.jsonl")):
        recs += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return recs


def launch_ranks(cluster: Cluster, nodes: list[int], per_node: int, steps: int, out: Path, start_step: int = 0,
                 workers: int = 2) -> list[subprocess.Popen]:
    """Real rank processes (each a DataLoader with `workers` worker processes), per node."""
    from workers.harness import python

    world = len(nodes) * per_node
    procs = []
    for k, node in enumerate(nodes):
        for local in range(per_node):
            rank = k * per_node + local
            env = dict(env_for_subprocess(), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local),
                       CROUPIER_AGENT=str(cluster.runtime(node)))
            with open(cluster.tmp / f"rank{rank}.log", "ab") as log:
                procs.append(subprocess.Popen(
                    [python(), str(REPO / "tests" / "workers" / "agent_rank.py"), "--job", JOB, "--steps",
                     str(steps), "--start-step", str(start_step), "--per-rank-batch", str(B // world),
                     "--workers", str(workers), "--out", str(out)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    return procs


def agent_stats(cluster: Cluster, node: int) -> dict:
    return json.loads((cluster.runtime(node) / "stats.json").read_text())


def test_four_nodes_of_two_ranks_with_two_workers_each(cluster, mds, tmp_path) -> None:
    """Real processes: 4 agents, 8 ranks, 16 DataLoader workers. The union of delivered steps is
    the global sequence, the decoded columns match the shards, the server holds one stream per
    node, each node's two ranks travel on one lane of that stream, and no node downloads a
    shard twice."""
    cluster.start_server()
    for node in range(4):
        cluster.start_agent(node, "--local-ranks", "2")
    steps = 24
    seen = {"sessions": 0, "streams": 0, "nodes": set(), "lanes": 0, "ranks": set()}
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.1):
            st = cluster.status()
            seen["sessions"] = max(seen["sessions"], len(st.sessions))
            seen["streams"] = max(seen["streams"], cluster.server.servicer.limits.open_streams())
            seen["nodes"] |= {s.node.node for s in st.sessions if s.node.node}
            seen["lanes"] = max([seen["lanes"], *(s.lanes for s in st.sessions)])
            seen["ranks"] |= {tuple(s.ranks) for s in st.sessions if s.lanes}

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = launch_ranks(cluster, list(range(4)), 2, steps, tmp_path / "out")
    try:
        for p in procs:
            assert p.wait(180) == 0, (tmp_path / f"rank{procs.index(p)}.log").read_text()[-3000:]
    finally:
        stop.set()
        for p in procs:
            kill_tree(p)
    recs = read_records(tmp_path / "out")
    ref = reference(steps)
    by_step: dict[int, dict[int, list[int]]] = {}
    for r in recs:
        assert r["step"] not in by_step.get(r["rank"], {}), f"step {r['step']} twice on rank {r['rank']}"
        by_step.setdefault(r["rank"], {})[r["step"]] = r["ids"]
        assert r["id"] == r["ids"] and r["text"] == [sample_text(i) for i in r["ids"]]
    for step in range(steps):
        union = np.concatenate([by_step[rank][step] for rank in range(8)])
        np.testing.assert_array_equal(union, ref[step])
    # One stream per node on the server, not one per rank or worker (8 ranks x 2 workers here).
    assert seen["streams"] <= 4 and seen["sessions"] == 4, seen
    assert seen["nodes"] == {f"node{n}" for n in range(4)}
    # One lane per node carries both of its ranks (the agents were told the node has 2 ranks);
    # when one rank finishes first, the other goes on alone.
    pairs = {(2 * n, 2 * n + 1) for n in range(4)}
    assert seen["lanes"] == 1 and pairs <= seen["ranks"], seen
    assert all(any(set(r) <= set(p) for p in pairs) for r in seen["ranks"]), seen
    # Each node downloaded each shard it read once, and only those.
    from croupier.format.mds_index import MDSIndex

    index = MDSIndex((mds / "index.json").read_bytes(), where="test")
    for node in range(4):
        kill_tree(cluster.agents[node], signal.SIGTERM)
        st = agent_stats(cluster, node)
        ids = np.concatenate([np.asarray(by_step[rank][s]) for rank in (2 * node, 2 * node + 1)
                              for s in range(steps)])
        touched = np.unique(index.table.shard_of(ids))
        assert st["shards_downloaded"] == len(touched), (node, st)
        assert st["bytes_downloaded"] == sum(index.shards[s].raw.bytes for s in touched.tolist()), (node, st)


LOOKAHEAD = 4
"""The trainers' lookahead: steps a rank may receive beyond the position it acknowledged."""


class Trainer(threading.Thread):
    """A rank reading through its node's agent (RankClient, as a trainer uses it).

    hold_at: after that many steps the trainer sets `held` and takes no more until `go` is set
    (its client still receives its lookahead meanwhile)."""

    def __init__(self, cluster: Cluster, node: int, rank: int, world: int, stop: int, hold_at: int | None = None,
                 **kw) -> None:
        super().__init__(daemon=True)
        self.client = client(cluster, node, rank, world, stop_step=stop, lookahead=LOOKAHEAD, **kw)
        self.rank = rank
        self.got: dict[int, np.ndarray] = {}
        self.duplicates = 0
        self.error: BaseException | None = None
        self.hold_at = hold_at
        self.held = threading.Event()
        self.go = threading.Event()

    def run(self) -> None:
        try:
            for step, ids in self.client:
                self.duplicates += step in self.got
                self.got[step] = np.array(ids)
                if len(self.got) == self.hold_at:
                    self.held.set()
                    self.go.wait(300)
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.error = exc
        finally:
            self.client.close()


def wait_progress(trainers: list[Trainer], step: int, timeout: float = 120) -> None:
    wait_for(lambda: min(len(t.got) for t in trainers) >= step or any(t.error for t in trainers), timeout,
             f"every rank past step {step}")
    assert not any(t.error for t in trainers), [t.error for t in trainers]


def finish(trainers: list[Trainer], first: int, stop: int) -> None:
    for t in trainers:
        t.join(180)
    assert not any(t.is_alive() for t in trainers)
    assert all(t.error is None for t in trainers), [t.error for t in trainers]
    assert all(t.duplicates == 0 for t in trainers)
    ref = reference(stop)
    for step in range(first, stop):
        np.testing.assert_array_equal(np.concatenate([t.got[step] for t in trainers]), ref[step])


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_agent_killed_mid_run_blocks_its_ranks_until_it_is_back(cluster) -> None:
    logs = Collect()
    logger = logging.getLogger("croupier.client.rank_client")
    logger.addHandler(logs)
    old_level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        _agent_killed_mid_run(cluster, logs)
    finally:
        logger.removeHandler(logs)
        logger.setLevel(old_level)


def _agent_killed_mid_run(cluster, logs: Collect) -> None:
    cluster.start_server()
    cluster.start_agent(0)
    cluster.start_agent(1)
    stop, hold = 85, 30
    trainers = [Trainer(cluster, r // 2, r, 4, stop, hold_at=hold) for r in range(4)]
    for t in trainers:
        t.start()
    try:
        # Every rank has taken exactly `hold` steps when node 0's agent dies.
        wait_for(lambda: all(t.held.is_set() for t in trainers) or any(t.error for t in trainers), 120,
                 f"every rank at step {hold}")
        assert [t.error for t in trainers] == [None] * 4
        kill_tree(cluster.agents[0], signal.SIGKILL)

        def rank_status() -> dict[int, pb2.RankStatus]:
            return {r.rank: r for r in cluster.status().ranks}

        # The server saw the agent's session end: it holds no stream of node 0's ranks, so what
        # it delivered to them before is all they can have until the agent is back.
        wait_for(lambda: not any(rank_status()[r].connected for r in (0, 1)), 60, "node 0's lanes closed")
        at_kill = {r: (rank_status()[r].next_step, rank_status()[r].delivered_step) for r in (0, 1)}
        for t in trainers:
            t.go.set()
        # Node 1's ranks run on to their stop (the lag bound, 128 steps past the slowest rank, is further).
        wait_for(lambda: not any(t.is_alive() for t in trainers[2:]), 120, "node 1's ranks done")
        assert [(t.error, sorted(t.got)) for t in trainers[2:]] == [(None, list(range(stop)))] * 2
        # Node 0's ranks are blocked: nothing more was delivered to them or heard from them, and they
        # took at most their lookahead past what they had acknowledged.
        now = rank_status()
        for t in trainers[:2]:
            position, delivered = at_kill[t.rank]
            assert (now[t.rank].next_step, now[t.rank].delivered_step) == (position, delivered), t.rank
            assert position <= hold and delivered <= position + LOOKAHEAD, (t.rank, position, delivered)
            assert t.is_alive() and t.error is None, t.rank
            assert hold <= len(t.got) <= delivered, (t.rank, len(t.got), delivered)
        cluster.start_agent(0)
    finally:
        for t in trainers:
            t.go.set()
    finish(trainers, 0, stop)
    assert any("agent" in m for m in logs.messages), "the ranks of the killed agent logged nothing"


def test_server_killed_under_agents_is_only_a_delay(tmp_path, mds) -> None:
    from workers.harness import python

    port = free_port()
    cmd = [python(), "-m", "croupier", "serve", "--cluster-sizes", ",".join(map(str, SIZES)), "--global-batch",
           str(B), "--policy", "clusterclip", "--clip", "3", "--seed", str(SEED), "--state-dir",
           str(tmp_path / "state"), "--port", str(port), "--job", JOB, "--log-level", "WARNING"]

    def start() -> subprocess.Popen:
        return start_serve(cmd, tmp_path / "server.log")

    server = start()
    c = Cluster(tmp_path, mds)
    c.address = f"127.0.0.1:{port}"
    try:
        for node in range(2):
            c.start_agent(node)
        stop = 85
        trainers = [Trainer(c, r // 2, r, 4, stop) for r in range(4)]
        for t in trainers:
            t.start()
        for k in (15, 50):
            wait_progress(trainers, k)
            stop_serve(server)
            server = start()
        finish(trainers, 0, stop)
        for n in range(2):
            kill_tree(c.agents[n], signal.SIGTERM)  # an agent writes its counters when it stops
            assert agent_stats(c, n)["session_losses"] >= 2
    finally:
        c.stop()
        stop_serve(server, signal.SIGTERM)


def test_elastic_resume_from_four_nodes_to_two(cluster) -> None:
    cluster.start_server()
    for node in range(4):
        cluster.start_agent(node)
    first = [Trainer(cluster, r // 2, r, 8, 20) for r in range(8)]
    for t in first:
        t.start()
    finish(first, 0, 20)
    with RankClient("agent", job=JOB, topology=Topology(0, 8), agent=str(cluster.runtime(0))) as admin:
        token = admin.checkpoint(20)
    # The job goes on with two nodes of two ranks, from the token, through the same agents.
    second = [Trainer(cluster, r // 2, r, 4, 45, resume_token=token) for r in range(4)]
    for t in second:
        t.start()
    finish(second, 20, 45)
    assert all(min(t.got) == 20 for t in second)


def test_auto_agent_is_started_by_local_rank_zero(cluster, tmp_path, monkeypatch) -> None:
    cluster.start_server()
    short = Path("/tmp") / f"cr-auto-{os.getpid()}"  # a short path: Unix socket paths are limited
    monkeypatch.setenv("CROUPIER_RUNTIME_DIR", str(short))
    monkeypatch.setenv("LOCAL_RANK", "0")
    try:
        with RankClient(cluster.address, job=JOB, topology=Topology(0, 1), agent="auto", stop_step=10,
                        lookahead=4) as c:
            got = dict(iter(c))
            runtime = Path(c.agent)
        assert runtime.parent == short and (runtime / "agent.sock").exists()
        ref = reference(10)
        for step in range(10):
            np.testing.assert_array_equal(got[step], ref[step])
        st = cluster.status()
        assert len(st.sessions) == 1  # the rank reached the server through the agent it started
        pid = json.loads((runtime / INFO_NAME).read_text())["pid"]
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not (runtime / "agent.sock").exists(), STOP_BOUND_S, "the agent to stop")
    finally:
        import shutil

        shutil.rmtree(short, ignore_errors=True)


def belady_bytes(sequence: list[int], sizes: np.ndarray, capacity: int) -> int:
    """Bytes an offline-optimal cache of `capacity` bytes downloads for this shard read
    sequence: on a miss, evict the resident shards used farthest in the future (never used
    again first) until the shard fits."""
    nxt = [0] * len(sequence)
    last: dict[int, int] = {}
    for i in range(len(sequence) - 1, -1, -1):
        nxt[i] = last.get(sequence[i], 1 << 62)
        last[sequence[i]] = i
    resident: dict[int, int] = {}  # shard -> its next use
    used = 0
    downloaded = 0
    for i, s in enumerate(sequence):
        if s in resident:
            resident[s] = nxt[i]
            continue
        size = int(sizes[s])
        while used + size > capacity:
            victim = max(resident, key=resident.__getitem__)
            used -= int(sizes[victim])
            del resident[victim]
        resident[s] = nxt[i]
        used += size
        downloaded += size
    return downloaded


def test_node_cache_under_a_limit_downloads_near_the_offline_optimum(tmp_path) -> None:
    from croupier.format.mds_index import MDSIndex

    n = 3000
    remote = write_mds(tmp_path / "big", n, size_limit=1 << 11)
    index = MDSIndex((remote / "index.json").read_bytes(), where="test")
    sizes = np.array([e.raw.bytes for e in index.shards], dtype=np.int64)
    limit = max(int(sizes.sum() * 0.10), int(sizes.max()))
    c = Cluster(tmp_path, remote)
    sizes_of_clusters = cluster_sizes(n, 12)
    try:
        c.start_server(sizes=sizes_of_clusters)
        c.start_agent(0, "--cache-limit", str(limit))
        steps = 60
        errors: list[BaseException] = []
        in_step = threading.Barrier(2, timeout=120)  # the ranks train in step, as an all-reduce keeps them

        def run(rank: int) -> None:
            try:
                ds = CroupierIterableDataset("agent", JOB, topology=Topology(rank, 2), steps=steps, start_step=0,
                                             lookahead=4, agent=str(c.runtime(0)))
                for _ in ds.iter_steps():
                    in_step.wait()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        kill_tree(c.agents[0], signal.SIGTERM)
        st = agent_stats(c, 0)
        ref = reference(steps, sizes_of_clusters)
        seq = [int(s) for step in range(steps) for s in index.table.shard_of(ref[step]).tolist()]
        optimum = belady_bytes(seq, sizes, limit)
        assert st["cache_limit"] == limit
        print(f"node downloaded {st['bytes_downloaded']} bytes, Belady {optimum} (ratio "
              f"{st['bytes_downloaded'] / optimum:.3f}), limit {limit} of {int(sizes.sum())}")
        # The target (<= 1.1x) is the benchmark's (bench_scale); how prefetch threads and the two
        # ranks interleave moves this run's figure (0.92-1.16 measured, 1.09-1.16 lately), so the test bounds it
        # loosely: a cache that evicted what the node still needs would download several times more.
        assert st["bytes_downloaded"] <= 1.3 * optimum
    finally:
        c.stop()


# -- stopping ----------------------------------------------------------------------------------------


def test_a_stop_in_the_same_loop_turn_as_a_consumer_request_still_stops(tmp_path) -> None:
    """A consumer's request wakes the agent's writer in the very loop turn its stop cancels it.
    Python 3.11's `asyncio.wait_for` then swallows the cancellation and the writer ran on, so
    the agent never finished stopping (its socket stayed, SIGTERM and the idle exit did
    nothing). Injected here deterministically: the request's wake-up and the stop in one turn,
    the server address dead."""
    import asyncio

    from croupier.client.agent.daemon import NodeAgent

    agent = NodeAgent(f"127.0.0.1:{free_port()}", tmp_path / "run", tmp_path / "cache")
    loop = asyncio.new_event_loop()
    ready = asyncio.Event()
    done = threading.Event()

    def serve() -> None:
        try:
            loop.run_until_complete(agent.run(ready))
        finally:
            done.set()

    threading.Thread(target=serve, daemon=True).start()
    wait_for(lambda: ready.is_set(), 30, "the agent to serve")
    wait_for(lambda: len(agent._flush._waiters) > 0, 30, "the writer to wait for work")  # type: ignore[attr-defined]

    def request_and_stop() -> None:
        agent._flush.set()  # what every consumer request does
        agent.stop()

    loop.call_soon_threadsafe(request_and_stop)
    assert done.wait(STOP_BOUND_S), "the agent did not stop"
    assert not socket_path(tmp_path / "run").exists()
    loop.close()


def serve_process(tmp_path: Path, mds: Path) -> tuple[subprocess.Popen, str]:
    """A real `croupier serve` process for the agent tests' job, reading `mds`."""
    from workers.harness import python

    port = free_port()
    cmd = [python(), "-m", "croupier", "serve", "--cluster-sizes", ",".join(map(str, SIZES)), "--remote", str(mds),
           "--global-batch", str(B), "--policy", "clusterclip", "--clip", "3", "--seed", str(SEED), "--state-dir",
           str(tmp_path / "state"), "--port", str(port), "--job", JOB, "--log-level", "WARNING"]
    return start_serve(cmd, tmp_path / "server.log"), f"127.0.0.1:{port}"


def test_agent_stops_on_sigterm_after_its_server_died(tmp_path, mds) -> None:
    """Real processes: a server, an agent, a rank (DataLoader, 2 workers) reading through it.
    The server is killed -9 while the rank reads; the rank keeps re-joining through the agent,
    which finds no server; then the agent gets SIGTERM and must exit within the bound, its
    socket removed."""
    server, address = serve_process(tmp_path, mds)
    c = Cluster(tmp_path, mds)
    c.address = address
    ranks: list[subprocess.Popen] = []
    try:
        agent = c.start_agent(0)
        out = tmp_path / "out"
        ranks = launch_ranks(c, [0], 1, 100_000, out, workers=2)
        wait_for(lambda: len(read_records(out)) >= 20, 120, "the rank to read")
        stop_serve(server)
        # The agent lost its session, and the rank re-joins through it (which finds no server).
        wait_for(lambda: "agent_session_lost" in (tmp_path / "agent0.log").read_text(), 60, "the agent's session loss")
        wait_for(lambda: "Join failed" in (tmp_path / "rank0.log").read_text(), 60, "the rank to re-join")
        assert agent.poll() is None and ranks[0].poll() is None

        os.kill(agent.pid, signal.SIGTERM)
        try:
            assert agent.wait(STOP_BOUND_S) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent is still running {STOP_BOUND_S:.0f} s after SIGTERM: "
                                 + (tmp_path / "agent0.log").read_text()[-3000:]) from None
        assert not socket_path(c.runtime(0)).exists()
        log_text = (tmp_path / "agent0.log").read_text()
        assert "agent_session_lost" in log_text and "agent_stop" in log_text
    finally:
        for p in ranks:
            kill_tree(p)
        c.stop()
        stop_serve(server)


def test_agent_exits_when_idle_after_its_server_died(tmp_path, mds) -> None:
    """A rank reads through an agent started with --exit-when-idle; the server is killed -9 and
    the rank gives up. With its server still dead, the agent drops the silent consumer and
    exits on its own, socket removed."""
    from croupier.client.agent.protocol import CONSUMER_TIMEOUT_S

    server, address = serve_process(tmp_path, mds)
    c = Cluster(tmp_path, mds)
    c.address = address
    idle = 5.0
    try:
        agent = c.start_agent(0, "--exit-when-idle", str(idle))
        rank = Trainer(c, 0, 0, 1, 100_000, backoff=Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=3))
        rank.start()
        wait_progress([rank], 10)
        stop_serve(server)
        rank.join(60)
        assert not rank.is_alive() and rank.error is not None  # it gave up on the dead server
        bound = CONSUMER_TIMEOUT_S + idle + STOP_BOUND_S
        try:
            assert agent.wait(bound) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the agent (--exit-when-idle {idle:.0f}) is still running {bound:.0f} s after "
                                 "its last consumer left: " + (tmp_path / "agent0.log").read_text()[-3000:]) from None
        assert not socket_path(c.runtime(0)).exists()
        assert "agent_idle_exit" in (tmp_path / "agent0.log").read_text()
    finally:
        c.stop()
        stop_serve(server)


def test_an_agent_whose_stop_hangs_still_exits_and_says_why(tmp_path) -> None:
    """The last resort: a stop that cannot finish (injected: the final stats write blocks for
    ever) ends the process anyway once `run_agent`'s deadline passes: status 1, the stuck
    stop logged with the threads' stacks, the socket removed."""
    from workers.harness import python

    runtime = tmp_path / "run"
    script = (
        "import time\n"
        "from croupier import logs\n"
        "from croupier.client.agent.daemon import NodeAgent, run_agent\n"
        "logs.configure('INFO')\n"
        f"agent = NodeAgent('127.0.0.1:{free_port()}', {str(runtime)!r}, {str(tmp_path / 'cache')!r})\n"
        "agent.write_stats = lambda: time.sleep(3600)\n"
        "run_agent(agent, deadline_s=3.0)\n"
    )
    log_path = tmp_path / "agent.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([python(), "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                env=env_for_subprocess(), start_new_session=True)
    try:
        wait_for(lambda: socket_path(runtime).exists(), 30, "the agent to serve")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(STOP_BOUND_S) == 1
        text = log_path.read_text()
        assert "agent_stop_timeout" in text and "daemon.py\", line" in text  # the stacks show where it hung
        assert not socket_path(runtime).exists()
    finally:
        kill_tree(proc)


def token_job(cluster: Cluster, counts: np.ndarray, tokens: int) -> Job:
    """A job dealt in tokens (`--global-tokens`) over the module's layout and `counts`."""
    from croupier.server.sampling.token_stream import TokenSchedule, mean_stream_tokens, plan_tokens

    layout = ClusterLayout.from_sizes(SIZES)
    schedule = TokenSchedule.constant(tokens)
    chunk, policy = plan_tokens(schedule, mean_stream_tokens(counts, layout.ids_at(np.arange(layout.num_positions))),
                                None, CONFIG)
    fp = index_fingerprint((cluster.remote / "index.json").read_bytes())
    spec = JobSpec(name=JOB, dataset_remote=str(cluster.remote), dataset_fingerprint=fp, max_lookahead=8)
    return Job(layout, policy, chunk, SEED, spec=spec, tokens=(schedule, [(0, counts)], chunk))


def test_ranks_of_a_token_job_through_agents_get_exactly_their_own_parts(cluster) -> None:
    """Steps in tokens through node agents: each node's lane carries its ranks' parts, the agent
    splits them by their tokens, and every rank gets the ids and spans it gets directly."""
    counts = (np.arange(N) * 37 % 97 + 3).astype(np.int64)
    tokens, steps, world = 256, 12, 4
    cluster.server, bound = create_server(token_job(cluster, counts, tokens), "127.0.0.1:0", max_workers=4)
    cluster.address = f"127.0.0.1:{bound}"
    for node in range(2):
        cluster.start_agent(node, "--local-ranks", "2")
    got: dict[int, dict[int, tuple[list[int], list]]] = {r: {} for r in range(world)}
    errors: list[BaseException] = []
    seen = threading.Event()  # the status has shown both nodes' sessions

    def run(rank: int) -> None:
        try:
            with client(cluster, rank // 2, rank, world, stop_step=steps, lookahead=4) as c:
                for step, ids in c:
                    got[rank][step] = (list(ids), c.last_spans)
                    if step == steps // 2:
                        seen.wait(60)  # the node's session stays open until the status shows it
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    want_lanes = {((0, 1), 1), ((2, 3), 1)}  # one lane of two ranks per node
    lanes: set[tuple[tuple[int, ...], int]] = set()  # (ranks, lanes) of each node's session
    deadline = time.monotonic() + 60
    while not want_lanes <= lanes and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        lanes |= {(tuple(x.ranks), x.lanes) for x in cluster.status().sessions if x.lanes}
        time.sleep(0.02)
    seen.set()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert want_lanes <= lanes, lanes
    direct, port = create_server(token_job(cluster, counts, tokens), "127.0.0.1:0", max_workers=4)
    try:
        for r in range(world):
            with RankClient(f"127.0.0.1:{port}", job=JOB, topology=Topology(r, world), stop_step=steps,
                            agent="") as c:
                want = {step: (list(ids), c.last_spans) for step, ids in c}
            assert sorted(got[r]) == list(range(steps)) and got[r] == want, r
            assert all(sum(b - a for a, b, _ in spans) == tokens // world for _, spans in want.values())
    finally:
        direct.stop(0, checkpoint=False)
