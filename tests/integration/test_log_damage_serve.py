"""The reproduction of a damaged event log, with real `croupier serve` and `croupier update`
processes: the server is killed with SIGKILL after a rank read 300 steps under four online
changes; a byte of the event log is flipped (inside a full-length record); the restarted
server deals every step again exactly. Damaged in both copies, the start is refused in one
line naming the file and the way on; `--accept-log-damage` starts and says what may differ;
`croupier status --json` shows the event log's state."""

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

from cases.serve_process import ServeProcess
from croupier.proto import pb2, slice_ids

FLAGS = ["--cluster-sizes", "3000,800,200,50,10", "--policy", "weighted", "--weights", "1,1,1,1,1", "--clip", "3",
         "--on-exhausted", "random", "--global-batch", "16", "--seed", "3"]
CHANGES = [(40, ["--clip", "4"]), (90, ["--weights", "3,1,2,3,5"]), (150, ["--weights", "1,1,2,3,5"]),
           (220, ["--clip", "9"])]


def croupier(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "croupier", *args], capture_output=True, text=True, timeout=120)


def read(server: ServeProcess, start: int, stop: int) -> list[np.ndarray]:
    """Rank 0 of world 1 reads and acknowledges steps [start, stop)."""
    out = []
    for t in range(start, stop):
        out.append(slice_ids(server.stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=1, step=t), timeout=20).slice))
        server.stub.Ack(pb2.AckRequest(rank=0, world_size=1, next_step=t + 1), timeout=20)
    return out


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, list[np.ndarray], ExitStack]]:
    """A state directory of the reproduction's job (killed with SIGKILL) and the 300 steps it dealt."""
    state = tmp_path / "state"
    with ExitStack() as stack:
        first = ServeProcess(FLAGS, state, tmp_path / "first.log")
        stack.callback(first.close)
        first.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
        delivered: list[np.ndarray] = []
        for step, change in CHANGES:
            delivered += read(first, len(delivered), step - 5)
            done = croupier("update", "--server", first.info["address"], "--step", str(step), *change)
            assert done.returncode == 0, done.stderr
        delivered += read(first, len(delivered), 300)
        assert first.kill() == -signal.SIGKILL
        yield state, delivered, stack


def replay(server: ServeProcess) -> list[np.ndarray]:
    """The restarted job's steps 0..299, read by a rank that starts over at step 0."""
    server.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
    return read(server, 0, 300)


@pytest.mark.slow
def test_a_flipped_byte_is_repaired_and_every_step_comes_back_exact(served, tmp_path: Path) -> None:
    state, delivered, stack = served
    log = state / "events.log"
    data = bytearray(log.read_bytes())
    data[223 % len(data)] ^= 64
    log.write_bytes(bytes(data))
    second = ServeProcess(FLAGS, state, tmp_path / "second.log")
    stack.callback(second.close)
    got = replay(second)
    assert all(np.array_equal(a, b) for a, b in zip(got, delivered)) and len(got) == 300
    assert "event log repaired from its other copy" in (tmp_path / "second.log").read_text()
    status = croupier("status", "--server", second.info["address"], "--json")
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["event_log"]
    assert shown["records"] == 4 and shown["failures"] == 0 and shown["start"].startswith("repaired")


@pytest.mark.slow
def test_damage_to_both_copies_refuses_the_start_and_accept_log_damage_says_what_differs(served,
                                                                                     tmp_path: Path) -> None:
    state, delivered, stack = served
    for name in ("events.log", "events.copy.log"):
        data = (state / name).read_bytes()
        (state / name).write_bytes(data[:len(data) - 30])
    refused = croupier("serve", *FLAGS, "--state-dir", str(state), "--port", "0")
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert "events.log" in line and "--fresh" in line and "--accept-log-damage" in line and "acknowledged" in line
    accepted = ServeProcess(FLAGS, state, tmp_path / "accepted.log", ["--accept-log-damage"])
    stack.callback(accepted.close)
    got = replay(accepted)
    assert all(np.array_equal(a, b) for a, b in zip(got[:220], delivered[:220]))
    assert "accepting event log damage" in (tmp_path / "accepted.log").read_text()
    assert accepted.status().event_log_start.startswith("accepted damage")
