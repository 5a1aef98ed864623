"""The node agent: real `croupier agent` processes over ZeroMQ IPC, a real server, real shards.

Each test compares what the consumers receive through their node's agent with an in-process
`Sampler` run (the one global sequence), and reads the server's status and the agents' own
reports for what the server and the nodes saw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from croupier.client.agent_protocol import INFO_NAME, socket_path
from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
from croupier.client.rank_client import Backoff, RankClient
from croupier.errors import ConfigError
from croupier.format.fingerprint import index_fingerprint
from croupier.proto import pb2
from croupier.server.engine import Sampler
from croupier.server.job import Job, JobSpec
from croupier.server.layout import ClusterLayout
from croupier.server.policy import PolicyConfig
from croupier.server.service import create_server
from croupier.server.store import CheckpointStore
from croupier.server.topology import Topology
from workers.harness import (CROUPIER, cluster_sizes, env_for_subprocess, free_port, kill_tree, sample_text,
                             wait_for, write_mds)

N = 240
SIZES = cluster_sizes(N, 8)
B = 8
SEED = 5
CONFIG = PolicyConfig(policy="clusterclip", clip=3)
JOB = "agentjob"

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


def reference(steps: int) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), CONFIG, B, seed=SEED)
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

    def start_server(self, port: int = 0, lookahead: int = 8):
        fp = index_fingerprint((self.remote / "index.json").read_bytes())
        spec = JobSpec(name=JOB, dataset_remote=str(self.remote), dataset_fingerprint=fp, max_lookahead=lookahead)
        job = Job(ClusterLayout.from_sizes(SIZES), CONFIG, B, SEED, spec=spec, store=CheckpointStore(self.tmp / "state"))
        self.server, bound = create_server(job, f"127.0.0.1:{port}", max_workers=4)
        self.address = f"127.0.0.1:{bound}"
        return self.server

    def runtime(self, node: int) -> Path:
        return self.tmp / f"n{node}" / "run"

    def cache(self, node: int) -> Path:
        return self.tmp / f"n{node}" / "cache"

    def start_agent(self, node: int, *extra: str, wait: bool = True) -> subprocess.Popen:
        log = open(self.tmp / f"agent{node}.log", "ab")
        proc = subprocess.Popen(
            [CROUPIER, "agent", "--server", self.address, "--runtime-dir", str(self.runtime(node)),
             "--cache-dir", str(self.cache(node)), "--node", f"node{node}", *extra],
            stdout=log, stderr=subprocess.STDOUT, env=env_for_subprocess(), start_new_session=True)
        log.close()
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
        from croupier.server.service import status_response

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


def test_ranks_through_agents_get_the_sequence_on_one_stream_per_node(cluster) -> None:
    cluster.start_server()
    for node in range(2):
        cluster.start_agent(node)
    got = run_ranks(cluster, nodes=2, per_node=2, steps=30)
    check_union(got, 30)


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
