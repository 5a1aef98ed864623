"""Multi-process proof: a `croupier serve` subprocess and `torchrun` ranks (gloo, CPU).

Each rank trains a tiny model on what `CroupierIterableDataset` yields and records
(step, rank, ids, decoded columns) per step (tests/workers/train_worker.py). The checks:
per step the ranks' union equals, in rank order, the global batch of an in-process `Sampler`
run with the same layout, policy, batch and seed (so no rank gets another's samples and none
is dropped); a step trained twice was dealt the same ids both times; what every rank decoded
is what the shards hold for the ids it was dealt. That holds through a kill -9 of the server
mid-run (restarted on the same state dir and port), a kill -9 of one rank (the job is
relaunched and the ranks resume from their checkpoints), and a resume with 2 ranks from a
4-rank checkpoint. Calls without the token are refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from croupier.client.errors import Unauthenticated
from croupier.client.rank_client import RankClient
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.topology import Topology
from workers.harness import (
    CROUPIER,
    REPO,
    VENV_BIN,
    cluster_sizes,
    env_for_subprocess,
    free_port,
    kill_tree,
    read_records,
    sample_text,
    wait_for,
    write_mds,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N = 240
SIZES = cluster_sizes(N, 8)
B = 8
SEED = 7
CLIP = 3
JOB = "proof"
TOKEN = "torchrun-proof-token"
WORKER = REPO / "tests" / "workers" / "train_worker.py"


def reference(steps: int) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig(policy="clusterclip", clip=CLIP), B, seed=SEED)
    return [s.next_batch() for _ in range(steps)]


class Cluster:
    """The processes of one test: a server (restartable on the same port and state dir) and torchruns."""

    def __init__(self, tmp: Path, remote: Path) -> None:
        self.tmp = tmp
        self.remote = remote
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.state = tmp / "state"
        self.cache = tmp / "cache"
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.server: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.env = env_for_subprocess()

    def start_server(self) -> None:
        n = len(list(self.logs.glob("server*.err")))
        cmd = [CROUPIER, "serve", "--cluster-sizes", ",".join(map(str, SIZES)), "--remote", str(self.remote),
               "--global-batch", str(B), "--seed", str(SEED), "--policy", "clusterclip", "--clip", str(CLIP),
               "--job", JOB, "--state-dir", str(self.state), "--port", str(self.port), "--lookahead", "4",
               "--checkpoint-every", "4", "--token-file", str(self.token_file), "--max-workers", "64"]
        with open(self.logs / f"server{n}.out", "w") as out, open(self.logs / f"server{n}.err", "w") as err:
            self.server = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True, env=self.env)
        self.procs.append(self.server)
        server = self.server

        def serving() -> bool:
            info = self.state / "server.json"
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}: "
                                   f"{(self.logs / f'server{n}.err').read_text()[-2000:]}")
            return info.exists() and json.loads(info.read_text()).get("pid") == server.pid

        wait_for(serving, 120, "the server to serve")

    def kill_server(self) -> None:
        assert self.server is not None
        kill_tree(self.server, signal.SIGKILL)

    def torchrun(self, nproc: int, out: str, stop_step: int, *extra: str, step_sleep: float = 0.0,
                 attempt: int = 0) -> subprocess.Popen:
        cmd = [str(VENV_BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               "--monitor_interval", "0.2", str(WORKER), "--attempt", str(attempt),
               "--server", self.address, "--job", JOB, "--cache", str(self.cache), "--out", str(self.tmp / out),
               "--ckpt", str(self.tmp / "ckpt"), "--stop-step", str(stop_step),
               "--per-rank-batch", str(B // nproc), "--token", TOKEN, "--step-sleep", str(step_sleep), *extra]
        with open(self.logs / f"torchrun-{out}-{attempt}.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=self.env, cwd=str(self.tmp))
        self.procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen, out: str, timeout: float = 300, attempt: int = 0) -> None:
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            rc = "timeout"
        if rc != 0:
            log = (self.logs / f"torchrun-{out}-{attempt}.log").read_text()
            raise AssertionError(f"torchrun {out} ended with {rc}:\n{log[-6000:]}")

    def max_step(self, out: str, rank: int | None = None) -> int:
        recs = [r for r in read_records(self.tmp / out) if rank is None or r["rank"] == rank]
        return max((r["step"] for r in recs), default=-1)

    def close(self) -> None:
        for p in self.procs:
            kill_tree(p)
        # torchrun starts each rank in its own session: a rank left behind by a failed run is
        # not in torchrun's process group, so end it by the pid it wrote.
        for pid_file in self.tmp.glob("*/pid.rank*"):
            kill_worker(int(pid_file.read_text()))


def kill_worker(pid: int) -> None:
    """SIGKILLs `pid` if it is still one of this test's rank processes."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if str(WORKER).encode() in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def remote(tmp_path_factory) -> Path:
    return write_mds(tmp_path_factory.mktemp("mds") / "ds", N)


@pytest.fixture
def cluster(tmp_path, remote):
    c = Cluster(tmp_path, remote)
    yield c
    c.close()


def check_records(records: list[dict], ref: list[np.ndarray], world: int, steps: range) -> None:
    """Every (step, rank) of `steps` recorded; ranks' union == global batch; decoded == shards."""
    by_step: dict[int, dict[int, list[int]]] = defaultdict(dict)
    for r in records:
        assert r["world"] == world
        assert r["steps"] == [r["step"]] * len(r["ids"]), "a batch mixed steps"
        assert r["col_id"] == r["ids"], f"step {r['step']} rank {r['rank']}: decoded ids differ from dealt ids"
        assert r["text"] == [sample_text(i) for i in r["ids"]]
        seen = by_step[r["step"]].setdefault(r["rank"], r["ids"])
        assert seen == r["ids"], f"step {r['step']} rank {r['rank']} was dealt different ids on a replay"
    assert sorted(by_step) == list(steps), f"recorded steps {sorted(by_step)} != {list(steps)}"
    for step in steps:
        ranks = by_step[step]
        assert sorted(ranks) == list(range(world))
        union = np.concatenate([ranks[r] for r in range(world)])
        np.testing.assert_array_equal(union, ref[step], err_msg=f"step {step}")


def test_ranks_survive_server_and_rank_kills_and_resume_on_two_ranks(cluster):
    """One job, every failure in turn (each torchrun launch costs ~10 s of start-up):

    1. 4 ranks train; the server is killed with -9 mid-run and restarted on the same state
       dir and port; the ranks reconnect and go on.
    2. Later rank 2 is killed with -9, which takes the torchrun job down; relaunched, every
       rank resumes from the newest checkpoint all ranks wrote (as a scheduler would) and
       finishes. Steps trained twice must have been dealt the same ids both times.
    3. A 2-rank job resumes from the 4-rank checkpoint of step 8 and trains past the end of
       the 4-rank run.
    Throughout, per step the ranks' union is the global batch of the in-process Sampler.
    """
    steps = 20
    ref = reference(steps)
    cluster.start_server()
    with RankClient(cluster.address, job=JOB, topology=Topology(0, 4), token="") as c, \
            pytest.raises(Unauthenticated):
        c.join()
    run = cluster.torchrun(4, "four", steps, "--resume", step_sleep=0.3)
    wait_for(lambda: cluster.max_step("four") >= 5 or run.poll() is not None, 240, "ranks to reach step 5")
    cluster.kill_server()
    server_killed_at = cluster.max_step("four")
    cluster.start_server()  # same state dir and port: the ranks reconnect
    wait_for(lambda: cluster.max_step("four", rank=2) >= 10 or run.poll() is not None, 240,
             "rank 2 to reach step 10")
    pid = int((cluster.tmp / "four" / "pid.rank2").read_text())
    os.kill(pid, signal.SIGKILL)
    rank_killed_at = cluster.max_step("four", rank=2)
    assert run.wait(timeout=120) != 0, "the job finished before rank 2 was killed"
    assert server_killed_at < rank_killed_at < steps - 1
    run = cluster.torchrun(4, "four", steps, "--resume", attempt=1)
    cluster.wait(run, "four", attempt=1)
    records = read_records(cluster.tmp / "four")
    second = [r for r in records if r["restart"] == 1]
    resumed_at = min(r["step"] for r in second)
    assert resumed_at % 4 == 0 and 0 < resumed_at <= rank_killed_at, f"resumed at step {resumed_at}"
    check_records(second, ref, 4, range(resumed_at, steps))
    check_records(records, ref, 4, range(steps))

    more = 28
    ref = reference(more)
    run = cluster.torchrun(2, "two", more, "--resume", "--resume-step", "8")
    cluster.wait(run, "two")
    check_records(read_records(cluster.tmp / "two"), ref, 2, range(8, more))
