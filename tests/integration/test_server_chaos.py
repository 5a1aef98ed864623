"""A real `croupier serve` under kill -9 and under a thousand open streams.

- Chaos: the server runs with its default flags (checkpoint every 1000 steps, lookahead 64,
  max lag 128); four RankClients read it as trainers do; the server is killed with SIGKILL
  at ten random steps, some before its first automatic checkpoint and some long after, and
  restarted on the same port. Every rank's steps must equal one uninterrupted
  `croupier simulate` run: nothing lost, duplicated or changed.
- Threads: 1,000 open streams on one server cost no threads; the server's thread count
  stays under THREAD_BOUND, and a connection over its per-peer stream limit is refused with
  RESOURCE_EXHAUSTED naming the limit.
- Burst: 2,500 streams opened at the same instant (a big job starting, or every rank
  reconnecting to a restarted server) are all served; gRPC core's default limit on calls the
  server has not taken up yet (1,000) cancelled hundreds of them.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import pytest

from croupier.client.rank_client import Backoff, RankClient
from croupier.grpc_options import channel_options
from croupier.proto import pb2, pb2_grpc
from croupier.topology import Topology
from workers.harness import env_for_subprocess, free_port, kill_tree, python

pytestmark = pytest.mark.slow

SIZES = "900,300,40,7"
B = 8
WORLD = 4
STEPS = 1400
THREAD_BOUND = 32
"""Most threads the server process may run with 1,000 open streams (gRPC core's pollers and
executor, the event loop, the checkpoint writer, the I/O pool, the signal loop)."""


class Server:
    """`croupier serve` with default flags on a fixed port; restartable after kill -9."""

    def __init__(self, tmp: Path, port: int, *extra: str) -> None:
        self.cmd = [python(), "-m", "croupier", "serve", "--cluster-sizes", SIZES, "--global-batch", str(B),
                    "--policy", "clusterclip", "--clip", "10", "--state-dir", str(tmp / "state"),
                    "--port", str(port), "--log-level", "WARNING", *extra]
        self.log = open(tmp / "server.log", "ab")
        self.proc: subprocess.Popen | None = None

    def start(self) -> dict:
        self._end()  # the previous process of a restart
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, env=env_for_subprocess(),
                                     start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"server did not start: {self.proc.wait()}"
        return json.loads(line)

    def kill(self) -> None:
        assert self.proc is not None
        self._end()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self.close()

    def close(self) -> None:
        """Ends the process group if it still runs and closes the pipes (always safe to call)."""
        self._end()
        self.log.close()

    def _end(self) -> None:
        """Kills the current process's group (SIGKILL) if it still runs and closes its stdout pipe."""
        if self.proc is not None:
            kill_tree(self.proc, signal.SIGKILL)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Servers and clients a test starts, ended when it ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def make_server(closing: ExitStack):
    """Servers made through this are always ended at teardown, whatever the test did."""

    def make(tmp: Path, port: int, *extra: str) -> Server:
        server = Server(tmp, port, *extra)
        closing.callback(server.close)
        return server

    return make


class Rank(threading.Thread):
    def __init__(self, address: str, rank: int) -> None:
        super().__init__(daemon=True)
        self.client = RankClient(address, job="default", topology=Topology(rank, WORLD), stop_step=STEPS,
                                 backoff=Backoff(initial_s=0.05, max_s=0.5, give_up_after_s=120))
        self.got: dict[int, list[int]] = {}
        self.duplicates = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for step, ids in self.client:
                self.duplicates += step in self.got
                self.got[step] = ids.tolist()
                time.sleep(0.002)  # a trainer's step takes time; lets the kills land across the run
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.error = exc
        finally:
            self.client.close()

    @property
    def progress(self) -> int:
        return len(self.got)


def test_kill_9_at_ten_random_steps_changes_nothing(tmp_path: Path, make_server) -> None:
    rng = random.Random(20261128)
    kills = sorted(rng.sample(range(40, 1000), 6) + rng.sample(range(1000, STEPS - 60), 4))
    port = free_port()
    server = make_server(tmp_path, port)
    server.start()
    ranks = [Rank(f"127.0.0.1:{port}", r) for r in range(WORLD)]
    for r in ranks:
        r.start()
    try:
        for k in kills:
            deadline = time.monotonic() + 120
            while max(r.progress for r in ranks) < k:
                assert time.monotonic() < deadline, f"ranks stalled before step {k}: {[r.progress for r in ranks]}"
                assert all(r.error is None for r in ranks), [r.error for r in ranks]
                time.sleep(0.005)
            server.kill()
            server.start()
        for r in ranks:
            r.join(180)
    finally:
        for r in ranks:
            r.client.close()
        code = server.stop()
    assert code == 0
    assert all(r.error is None for r in ranks), [r.error for r in ranks]
    sim = subprocess.run([python(), "-m", "croupier", "simulate", "--cluster-sizes", SIZES, "--global-batch", str(B),
                          "--policy", "clusterclip", "--clip", "10", "--steps", str(STEPS), "--format", "jsonl"],
                         capture_output=True, text=True, check=True, env=env_for_subprocess(), timeout=300)
    expected = [json.loads(line)["indices"] for line in sim.stdout.splitlines() if line.startswith("{")]
    assert len(expected) == STEPS
    p = B // WORLD
    for r in ranks:
        assert r.duplicates == 0 and sorted(r.got) == list(range(STEPS))
        for t in range(STEPS):
            assert r.got[t] == expected[t][r.client.topology.rank * p:(r.client.topology.rank + 1) * p], (r, t)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def test_thousand_open_streams_cost_no_threads(tmp_path: Path, make_server) -> None:
    port = free_port()
    server = make_server(tmp_path, port, "--streams-per-peer", "1000")
    server.start()
    address = f"127.0.0.1:{port}"
    counts: dict[str, int] = {}

    async def run() -> tuple[grpc.StatusCode, str]:
        async with grpc.aio.insecure_channel(address, options=channel_options()) as ch:
            stub = pb2_grpc.SamplerStub(ch)
            await stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=10)
            calls = [stub.StreamSlices(pb2.StreamSlicesRequest(rank=0, world_size=1, start_step=i % 50,
                                                              read_only=True), timeout=120)
                     for i in range(1000)]
            firsts = await asyncio.gather(*(c.read() for c in calls))
            assert all(len(f.slices) > 0 for f in firsts)
            counts["open"] = _threads(server.proc.pid)
            extra = stub.StreamSlices(pb2.StreamSlicesRequest(rank=0, world_size=1, read_only=True), timeout=30)
            try:
                await extra.read()
                refused = (grpc.StatusCode.OK, "")
            except grpc.aio.AioRpcError as exc:
                refused = (exc.code(), exc.details())
            status = await stub.GetStatus(pb2.GetStatusRequest(), timeout=10)
            assert status.generated_step > 0
            for c in calls:
                c.cancel()
            return refused

    try:
        code, details = asyncio.run(run())
    finally:
        assert server.stop() == 0
    print("server threads with 1000 open streams:", counts["open"])
    assert counts["open"] < THREAD_BOUND, counts
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 1000 per peer" in details


def test_a_burst_of_2500_stream_opens_loses_none(tmp_path: Path, make_server) -> None:
    port = free_port()
    server = make_server(tmp_path, port)
    server.start()
    n = 2500

    async def run() -> Counter:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as ch:
            stub = pb2_grpc.SamplerStub(ch)
            await stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=30)

            async def one(i: int) -> str:
                call = stub.Session(timeout=120)
                try:
                    await call.write(pb2.SessionRequest(open=[pb2.LaneOpen(
                        lane=1, rank=0, world_size=1, start_step=i % 50, lookahead=2, read_only=True)]))
                    resp = await call.read()
                    call.cancel()
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name
                if resp is grpc.aio.EOF or not resp.lanes or not resp.lanes[0].slices:
                    return f"no slices: {resp}"
                return "served"

            return Counter(await asyncio.gather(*(one(i) for i in range(n))))

    try:
        outcomes = asyncio.run(run())
    finally:
        assert server.stop() == 0
    assert outcomes == Counter({"served": n}), outcomes


def test_sigterm_without_a_state_dir_exits_non_zero_with_the_reason(tmp_path: Path, make_server,
                                                                    closing: ExitStack) -> None:
    port = free_port()
    server = make_server(tmp_path, port)
    server.start()
    client = closing.enter_context(RankClient(f"127.0.0.1:{port}", job="default", topology=Topology(0, 1),
                                              stop_step=20))
    assert [step for step, _ in client] == list(range(20))
    client.close()
    import shutil

    shutil.rmtree(tmp_path / "state")  # the disk is gone when the server is asked to stop
    code = server.stop()
    assert code == 1
    log = (tmp_path / "server.log").read_text()
    assert "final checkpoint not written" in log and "No such file or directory" in log
