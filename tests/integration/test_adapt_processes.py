"""Adaptive weights through real processes: a kill -9 of the server replays every delivered step and the
controller resumes; loss reports travel through a node agent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cases.adapt import SIZES, B, losses_of
from croupier.client.rank_client import Backoff, RankClient
from croupier.layout import ClusterLayout
from croupier.server.feedback.adapt import AdaptSpec
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.serving.service import create_server
from croupier.topology import Topology

_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test():
    """Servers and agents a test starts are killed when it ends, whether it passed or not."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


ARGS = ["--cluster-sizes", ",".join(map(str, SIZES)), "--policy", "clusterclip", "--clip", "50", "--global-batch",
        str(B), "--seed", "0"]


def _serve(state: Path, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "croupier", "serve", *ARGS, "--state-dir", str(state),
                             "--adapt", "loss-softmax", "--adapt-every", "5", "--checkpoint-every", "10",
                             "--lookahead", "2", "--job", "a", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=open(log, "ab"))
    _STARTED.append(proc)
    line = proc.stdout.readline()
    assert line, log.read_text()
    return proc, json.loads(line)["address"]


@pytest.mark.slow
def test_kill9_replays_every_delivered_step_and_the_controller_resumes(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "server.log"
    proc, address = _serve(state, log)
    delivered: list[np.ndarray] = []
    with RankClient(address, job="a", topology=Topology(0, 1), lookahead=2, stop_step=43,
                    backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30)) as c:
        for step, ids in c:
            delivered.append(ids)
            c.report_losses(step, losses_of(ids))
            assert c.flush_losses(10)
        status = c.status()
    accepted_before = status.adapt.reports_accepted
    assert accepted_before == 43 and any(ch.origin == "loss-softmax" for ch in status.adapt.changes)
    proc.send_signal(signal.SIGKILL)
    proc.wait(20)
    # simulate replays the job's sequence from its state directory (no losses needed).
    out = subprocess.run([sys.executable, "-m", "croupier", "simulate", "--state-dir", str(state), "--cluster-sizes",
                          ",".join(map(str, SIZES)), "--global-batch", str(B), "--seed", "0", "--format", "jsonl",
                          "--steps", "43"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    replay = [np.array(json.loads(x)["indices"]) for x in out.stdout.splitlines()]
    assert all(np.array_equal(a, b) for a, b in zip(replay, delivered)) and len(replay) == 43
    proc, address = _serve(state, log)
    try:
        with RankClient(address, job="a", topology=Topology(0, 1), lookahead=2,
                        backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30)) as c:
            for t in range(0, 43, 7):  # every delivered step comes back identical
                assert np.array_equal(c.get_slice(t), delivered[t]), t
            restored = c.status().adapt.reports_accepted
        # Reports since the last checkpoint (at most one checkpoint interval of them) may be lost.
        assert 43 - 10 - 2 <= restored <= 43
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.slow
def test_loss_reports_travel_through_the_node_agent(tmp_path: Path) -> None:
    from croupier.client.agent.protocol import INFO_NAME, socket_path
    from workers.harness import CROUPIER, env_for_subprocess, kill_tree, wait_for

    job = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
              spec=JobSpec(name="a", max_lookahead=4), adapt=AdaptSpec("odm", every=10))
    server, port = create_server(job, "127.0.0.1:0")
    runtime = tmp_path / "run"
    with open(tmp_path / "agent.log", "wb") as log:
        agent = subprocess.Popen([CROUPIER, "agent", "--server", f"127.0.0.1:{port}", "--runtime-dir", str(runtime),
                                  "--cache-dir", str(tmp_path / "cache")], stdout=log, stderr=subprocess.STDOUT,
                                 env=env_for_subprocess(), start_new_session=True)
    _STARTED.append(agent)
    try:
        wait_for(lambda: socket_path(runtime).exists() and (runtime / INFO_NAME).exists(), 60, "the agent")
        with RankClient("agent", job="a", topology=Topology(0, 1), agent=str(runtime), lookahead=4,
                        stop_step=20) as c:
            for step, ids in c:
                c.report_losses(step, losses_of(ids))
            assert c.flush_losses(30)
            assert c.loss_report_stats()["accepted"] == 20
        assert job.status().adapt.accepted == 20
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(60)
        finally:
            kill_tree(agent)
        server.stop(0)
        job.close()
