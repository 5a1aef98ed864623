"""A refused `croupier serve` start writes nothing into its state directory: refusals found
before the job is made (flags past their limits) never touch it, and refusals found once the
job was made (its own checks, a port that cannot be bound) remove what the start wrote, while
an existing job's files stay as they were."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from workers.harness import terminate

BASE = ["--cluster-sizes", "30,20,10", "--clip", "2", "--global-batch", "4"]


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "croupier", "serve", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def held_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("extra", [
    ["--global-batch", "-1"], ["--max-workers", "0"], ["--streams-per-peer", "0"], ["--port", "70000"],
    ["--grace", "-1"], ["--global-batch", "4000000"],
    ["--policy", "weighted", "--weights", "1,2"],  # refused by the job's sampler: 3 clusters
    ["--adapt", "odm", "--adapt-groups", "sources"],  # refused by the job: no mixture
])
def test_a_refused_start_leaves_no_state_directory(extra, tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = serve(*BASE, "--state-dir", str(state), "--port", "0", *extra)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("croupier serve: error: "), r.stderr
    assert "Traceback" not in r.stderr
    assert not state.exists(), sorted(p.name for p in state.iterdir())


def test_a_start_refused_at_bind_removes_what_it_wrote_and_keeps_a_job_s_files(tmp_path: Path, held_port) -> None:
    state = tmp_path / "state"
    r = serve(*BASE, "--state-dir", str(state), "--port", str(held_port), "--log-level", "WARNING")
    assert r.returncode == 2 and f"cannot bind 127.0.0.1:{held_port}" in r.stderr, r.stderr
    assert not state.exists()
    # A job that served: its files stay when a later start is refused after the job was made.
    proc = subprocess.Popen([sys.executable, "-m", "croupier", "serve", *BASE, "--state-dir", str(state),
                             "--port", "0", "--log-level", "WARNING"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "serving"
    finally:
        terminate(proc)
        proc.stdout.close()
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    assert {".lock", "events.log", "server.json"} <= set(before)
    r = serve(*BASE, "--state-dir", str(state), "--port", str(held_port), "--log-level", "WARNING")
    assert r.returncode == 2 and f"cannot bind 127.0.0.1:{held_port}" in r.stderr, r.stderr
    after = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    assert set(after) == set(before)
    assert after["events.log"] == before["events.log"]
