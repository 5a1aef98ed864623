"""`croupier serve` killed with SIGKILL and restarted: identical batches, a corrupt newest checkpoint
falls back loudly, a state directory of another configuration is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from cases.durability import SIZES, B, fetch, reference
from cases.serve_process import ServeProcess
from croupier.proto import pb2
from croupier.server.durability.checkpoint_store import CheckpointStore
from workers.harness import wait_for

ARGS = ["--cluster-sizes", ",".join(map(str, SIZES)), "--policy", "clusterclip", "--clip", "5",
        "--global-batch", str(B), "--seed", "0", "--checkpoint-every", "10", "--max-lag", "16", "--lookahead", "4"]


class Serve(ServeProcess):
    """`croupier serve` with this module's ARGS (see `cases.serve_process.ServeProcess`)."""

    def __init__(self, state_dir: Path, log_path: Path, extra: list[str] | None = None) -> None:
        super().__init__(ARGS, state_dir, log_path, extra)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    """serve(state_dir, extra=None) -> a started `Serve` logging to tmp_path/server.log; every
    server a test starts is ended when the test ends, passed or failed."""
    with ExitStack() as stack:

        def start(state_dir: Path, extra: list[str] | None = None) -> Serve:
            server = Serve(state_dir, tmp_path / "server.log", extra)
            stack.callback(server.close)
            return server

        yield start


def wait_durable(server: Serve, step: int) -> None:
    """Waits until the server's background writer has made the automatic checkpoint of
    `step` durable (what a kill -9 after it is guaranteed to leave)."""
    wait_for(lambda: server.status().durable_step >= step, 30, f"the checkpoint of step {step} to be durable")


@pytest.mark.slow
def test_sigkill_and_restart_resumes_with_identical_batches(tmp_path: Path, serve) -> None:
    ref = reference(90)
    state = tmp_path / "state"
    first = serve(state)
    for r in range(2):
        first.stub.Join(pb2.JoinRequest(rank=r, world_size=2), timeout=20)
    got = fetch(first.stub, 2, 0, 57)
    token = first.stub.Checkpoint(pb2.CheckpointRequest(step=33), timeout=20).token  # between 30 and 40
    wait_durable(first, 50)  # the automatic checkpoint of step 50 (written in the background)
    assert (state / "ckpt-000000000050.bin").is_file()
    assert first.kill() == -signal.SIGKILL
    assert json.loads((state / "server.json").read_text())["address"] == first.info["address"]

    second = serve(state)
    assert second.info["resumed_from"] == 50
    # Ranks that reconnect resume at their acknowledged step.
    nexts = [second.stub.Join(pb2.JoinRequest(rank=r, world_size=2), timeout=20).next_step for r in range(2)]
    assert nexts[0] == nexts[1] and 50 <= nexts[0] <= 57
    got += fetch(second.stub, 2, 57, 70)
    for t in range(70):
        assert np.array_equal(got[t], ref[t]), t
    # The trainer restarts from its checkpoint at step 33 with 4 ranks (elastic resume).
    for r in range(4):
        assert second.stub.Join(pb2.JoinRequest(rank=r, world_size=4, resume_token=token),
                                timeout=20).next_step == 33
    again = fetch(second.stub, 4, 33, 80)
    for t, batch in zip(range(33, 80), again):
        assert np.array_equal(batch, ref[t]), t
    assert second.kill(signal.SIGTERM) == 0


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_loudly(tmp_path: Path, serve) -> None:
    ref = reference(60)
    state = tmp_path / "state"
    first = serve(state)
    first.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
    fetch(first.stub, 1, 0, 35)
    wait_durable(first, 30)
    assert first.kill() == -signal.SIGKILL
    store = CheckpointStore(state)
    previous, newest = store.steps()[-2:]
    assert (previous, newest) == (20, 30)
    path = store.path_of(newest)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))

    second = serve(state)
    assert second.info["resumed_from"] == previous
    warnings = [json.loads(line) for line in second.log_path.read_text().splitlines()
                if line.startswith("{") and '"checkpoint_corrupt"' in line]
    assert warnings and warnings[0]["level"] == "WARNING" and warnings[0]["path"] == str(path)
    assert "checksum" in warnings[0]["reason"]
    second.stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=20)
    for t, batch in zip(range(25, 50), fetch(second.stub, 1, 25, 50)):
        assert np.array_equal(batch, ref[t]), t
    assert second.kill(signal.SIGTERM) == 0


@pytest.mark.slow
def test_state_dir_of_another_config_is_refused(tmp_path: Path, serve) -> None:
    state = tmp_path / "state"
    first = serve(state)
    first.stub.Checkpoint(pb2.CheckpointRequest(step=3), timeout=20)
    assert first.kill(signal.SIGTERM) == 0
    cmd = [sys.executable, "-m", "croupier", "serve", *ARGS, "--state-dir", str(state), "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "fingerprint mismatch" in proc.stderr and str(state) in proc.stderr
