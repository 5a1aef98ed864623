"""`croupier status` shows the server's durability where an operator looks: checkpoint health
(the last write error and the failed writes), the generated mark, and what the server says
about its event log, in the table and in `--json`. Against a real `croupier serve` whose
state directory is deleted while it serves."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from croupier.cli import main
from croupier.client.cli.admin_cli import EVENT_LOG_PREFIX
from croupier.client.rank_client import Backoff, RankClient
from croupier.proto import pb2
from croupier.topology import Topology
from workers.harness import terminate, wait_for


@pytest.fixture
def serving(tmp_path: Path):
    state = tmp_path / "state"
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed with the test
    proc = subprocess.Popen([sys.executable, "-m", "croupier", "serve", "--cluster-sizes", "300,200,100,50",
                             "--clip", "3", "--on-exhausted", "random", "--global-batch", "8", "--seed", "1", "--state-dir", str(state), "--port", "0",
                             "--checkpoint-every", "5", "--lookahead", "4"],
                            stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        yield info["address"], state
    finally:
        terminate(proc)
        proc.stdout.close()
        log.close()


def status_json(address: str, capsys) -> dict:
    assert main(["status", "--server", address, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_status_shows_checkpoint_health_the_generated_mark_and_the_event_log(serving, capsys) -> None:
    address, state = serving
    client = RankClient(address, job="default", topology=Topology(0, 1), lookahead=4, ack_interval_s=0.1,
                        backoff=Backoff(initial_s=0.05, max_s=0.2, give_up_after_s=30))
    try:
        for step in range(20):
            assert client.next_slice(timeout=10)[0] == step
        wait_for(lambda: status_json(address, capsys)["durable_step"] >= 15, 30, "a durable checkpoint")
        healthy = status_json(address, capsys)
        assert healthy["checkpoint_error"] == "" and healthy["checkpoint_failures"] == 0
        assert healthy["checkpoints_healthy"] is True
        assert healthy["generated_mark"] >= 20  # every step dealt is under the mark
        fields = [f.name for f in pb2.GetStatusResponse.DESCRIPTOR.fields if f.name.startswith(EVENT_LOG_PREFIX)]
        assert sorted(healthy["event_log"]) == sorted(f[len(EVENT_LOG_PREFIX):] for f in fields)
        assert main(["status", "--server", address]) == 0
        table = capsys.readouterr().out
        assert "checkpoints healthy (0 failed writes since start)" in table
        assert f"generated mark {healthy['generated_mark']} " in table

        shutil.rmtree(state)  # the state directory is gone under the running server
        for step in range(20, 60):
            assert client.next_slice(timeout=10)[0] == step
        failing = wait_for(lambda: (s := status_json(address, capsys))["checkpoint_failures"] >= 1 and s, 30,
                           "a failed checkpoint write in status")
        assert failing["checkpoints_healthy"] is False
        assert "No such file or directory" in failing["checkpoint_error"]
        assert str(state) in failing["checkpoint_error"]
        assert main(["status", "--server", address]) == 0
        table = capsys.readouterr().out
        line = next(x for x in table.splitlines() if x.startswith("checkpoints FAILING: "))
        assert "No such file or directory" in line and "failed writes since start" in line
    finally:
        client.close()
