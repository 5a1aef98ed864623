"""Adaptive weights through real processes: a kill -9 of the server replays every delivered step and the
controller resumes; loss reports travel through a node agent."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from cases.adapt import SIZES, B, losses_of
from croupier.client.rank_client import Backoff, RankClient
from croupier.layout import ClusterLayout
from croupier.server.feedback.adapt import AdaptSpec
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.topology import Topology
from jobs import start_server
from workers.harness import kill_tree, wait_for


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Servers, agents and jobs a test starts, ended when it ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


def _ended(stack: ExitStack, proc: subprocess.Popen) -> subprocess.Popen:
    """`proc` (started with start_new_session=True), killed with its group if it still runs and
    its stdout pipe closed when `stack` unwinds."""

    def end() -> None:
        kill_tree(proc)
        if proc.stdout is not None:
            proc.stdout.close()

    stack.callback(end)
    return proc


ARGS = ["--cluster-sizes", ",".join(map(str, SIZES)), "--policy", "clusterclip", "--clip", "50", "--global-batch",
        str(B), "--seed", "0"]


def _serve(stack: ExitStack, state: Path, log: Path) -> tuple[subprocess.Popen, str]:
    with open(log, "ab") as err:  # the server writes its own copy of the descriptor
        proc = _ended(stack, subprocess.Popen(
            [sys.executable, "-m", "croupier", "serve", *ARGS, "--state-dir", str(state), "--adapt", "loss-softmax",
             "--adapt-every", "5", "--checkpoint-every", "10", "--lookahead", "2", "--job", "a", "--log-level",
             "WARNING"], stdout=subprocess.PIPE, stderr=err, start_new_session=True))
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, log.read_text()
    return proc, json.loads(line)["address"]


@pytest.mark.slow
def test_kill9_replays_every_delivered_step_and_the_controller_resumes(tmp_path: Path, closing: ExitStack) -> None:
    state, log = tmp_path / "state", tmp_path / "server.log"
    proc, address = _serve(closing, state, log)
    delivered: list[np.ndarray] = []
    with RankClient(address, job="a", topology=Topology(0, 1), lookahead=2, stop_step=43,
                    backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30)) as c:
        for step, ids in c:
            delivered.append(ids)
            c.report_losses(step, losses_of(ids))
            assert c.flush_losses(10)
        status = c.status()
        # The automatic checkpoint of step 40 (its adapter statistics) is written in the background:
        # the kill comes once it is durable, so the restart's statistics are known to within its interval.
        wait_for(lambda: c.status().durable_step >= 40, 30, "the checkpoint of step 40 to be durable")
    accepted_before = status.adapt.reports_accepted
    assert accepted_before == 43 and any(ch.origin == "loss-softmax" for ch in status.adapt.changes)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(20) == -signal.SIGKILL
    # simulate replays the job's sequence from its state directory (no losses needed).
    out = subprocess.run([sys.executable, "-m", "croupier", "simulate", "--state-dir", str(state), "--cluster-sizes",
                          ",".join(map(str, SIZES)), "--global-batch", str(B), "--seed", "0", "--format", "jsonl",
                          "--steps", "43"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    replay = [np.array(json.loads(x)["indices"]) for x in out.stdout.splitlines()]
    assert all(np.array_equal(a, b) for a, b in zip(replay, delivered)) and len(replay) == 43
    proc, address = _serve(closing, state, log)
    with RankClient(address, job="a", topology=Topology(0, 1), lookahead=2,
                    backoff=Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30)) as c:
        for t in range(0, 43, 7):  # every delivered step comes back identical
            assert np.array_equal(c.get_slice(t), delivered[t]), t
        restored = c.status().adapt.reports_accepted
    # Reports since the last checkpoint (at most one checkpoint interval of them) may be lost.
    assert 43 - 10 - 2 <= restored <= 43
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.mark.slow
def test_loss_reports_travel_through_the_node_agent(tmp_path: Path, closing: ExitStack) -> None:
    from croupier.client.agent.protocol import INFO_NAME, socket_path
    from workers.harness import CROUPIER, env_for_subprocess

    job = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), B, 0,
              spec=JobSpec(name="a", max_lookahead=4), adapt=AdaptSpec("odm", every=10))
    _, port = start_server(closing, job, checkpoint=True)
    runtime = tmp_path / "run"
    with open(tmp_path / "agent.log", "wb") as log:
        agent = _ended(closing, subprocess.Popen(
            [CROUPIER, "agent", "--server", f"127.0.0.1:{port}", "--runtime-dir", str(runtime), "--cache-dir",
             str(tmp_path / "cache")], stdout=log, stderr=subprocess.STDOUT, env=env_for_subprocess(),
            start_new_session=True))
    wait_for(lambda: socket_path(runtime).exists() and (runtime / INFO_NAME).exists(), 60, "the agent")
    with RankClient("agent", job="a", topology=Topology(0, 1), agent=str(runtime), lookahead=4,
                    stop_step=20) as c:
        for step, ids in c:
            c.report_losses(step, losses_of(ids))
        assert c.flush_losses(30)
        assert c.loss_report_stats()["accepted"] == 20
    assert job.status().adapt.accepted == 20
    agent.send_signal(signal.SIGTERM)  # the agent stops before its server
    agent.wait(60)
