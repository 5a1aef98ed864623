"""Faults a training cluster meets, each injected, with the server staying live.

Real gRPC servers in-process (one per test) and real RankClients; faults are injected by a
server interceptor (dropped acknowledgements), raw streams that never read, a rank that goes
away, a checkpoint-writer fault hook (read-only / full disk) and a state directory deleted
under the running server. "Progress within a bound" means the healthy ranks reach a stated
step within a stated number of seconds.
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from cases.server_faults import CONFIG, SIZES, B, make_job
from croupier.cli import main
from croupier.client.errors import Unavailable
from croupier.client.rank_client import Backoff, RankClient
from croupier.errors import ConfigError, FingerprintMismatch
from croupier.grpc_options import channel_options
from croupier.layout import ClusterLayout
from croupier.proto import pb2, pb2_grpc
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.serving.metrics import ServerMetrics
from croupier.server.serving.service import CHECKPOINT_HEALTH, SamplerServer
from croupier.topology import Topology
from jobs import get_slice, start_server
from workers.harness import free_port, wait_for


def reference(n: int) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), CONFIG, B, seed=0)
    return [s.next_batch() for _ in range(n)]


def rank_client(address: str, rank: int, world: int, **kw) -> RankClient:
    kw.setdefault("backoff", Backoff(initial_s=0.02, max_s=0.2, give_up_after_s=30))
    kw.setdefault("lookahead", 4)
    kw.setdefault("ack_interval_s", 0.1)
    kw.setdefault("heartbeat_s", 0.2)
    return RankClient(address, job="default", topology=Topology(rank, world), **kw)


class Trainer(threading.Thread):
    """A rank reading `steps` steps through a RankClient, recording what it got."""

    def __init__(self, address: str, rank: int, world: int, steps: int, **kw) -> None:
        super().__init__(daemon=True)
        self.client = rank_client(address, rank, world, stop_step=steps, **kw)
        self.got: dict[int, np.ndarray] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for step, ids in self.client:
                self.got[step] = ids
        except BaseException as exc:  # noqa: BLE001 - checked by the test
            self.error = exc
        finally:
            self.client.close()


def check_exact(trainers: list[Trainer], steps: int) -> None:
    ref = reference(steps)
    world = len(trainers)
    for t in trainers:
        assert t.error is None, t.error
        assert sorted(t.got) == list(range(steps))
    for step in range(steps):
        assert np.array_equal(np.concatenate([trainers[r].got[step] for r in range(world)]), ref[step])


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Jobs, servers, clients and channels a test opens, closed when it ends, passed or failed
    (last opened, first closed)."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def serve(closing: ExitStack) -> Callable[..., tuple[SamplerServer, str]]:
    """serve(job, address="127.0.0.1:0", **kw) -> (server, address): stopped, and its job
    closed, when the test ends."""

    def start(job: Job, address: str = "127.0.0.1:0", **kw) -> tuple[SamplerServer, str]:
        server, port = start_server(closing, job, address, **kw)
        return server, f"127.0.0.1:{port}"

    return start


class DropAcks(grpc.aio.ServerInterceptor):
    """Fault injector: strips the acknowledgements from every other Session message that
    carries any, as a lossy link would lose them."""

    def __init__(self) -> None:
        self.seen = 0
        self.dropped = 0

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if not details.method.endswith("/Session"):
            return handler

        async def filtered(raw_requests):
            async for raw in raw_requests:
                msg = pb2.SessionRequest.FromString(raw)
                if msg.acks:
                    self.seen += 1
                    if self.seen % 2 == 0:
                        self.dropped += 1
                        del msg.acks[:]
                yield msg.SerializeToString()

        async def session(raw_requests, context):
            async for item in handler.stream_stream(filtered(raw_requests), context):
                yield item

        return grpc.stream_stream_rpc_method_handler(session, handler.request_deserializer,
                                                     handler.response_serializer)


def test_dropped_acks_do_not_stall_flow_control(serve) -> None:
    drops = DropAcks()
    _, address = serve(make_job(), interceptors=[drops])
    steps = 120
    trainers = [Trainer(address, r, 2, steps, ack_every=1) for r in range(2)]
    for t in trainers:
        t.start()
    for t in trainers:
        t.join(60)  # bound: 120 steps in 60 s (a stall would hold them at lookahead 4 forever)
    assert not any(t.is_alive() for t in trainers)
    check_exact(trainers, steps)
    assert drops.dropped > 10


def test_dump_against_live_ranks_moves_no_position(serve, capsys) -> None:
    job = make_job()
    _, address = serve(job)
    steps = 80
    trainers = [Trainer(address, r, 2, steps) for r in range(2)]
    for t in trainers:
        t.start()
    wait_for(lambda: job.status().slowest_step >= 20, 30, "ranks at step 20")
    # Watch rank 0's position and the slowest step all through the dump: neither may move back
    # (the old server moved rank 0 back to 0 while a reader read from there).
    seen: list[tuple[int, int]] = []
    dumping = threading.Event()
    dumping.set()

    def watch() -> None:
        while dumping.is_set():
            st = job.status()
            seen.append((st.slowest_step, next(r.next_step for r in st.ranks if r.rank == 0)))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    wait_for(lambda: len(seen) >= 1, 10, "the first position sample")
    try:
        assert main(["client", "dump", "--server", address, "--rank", "0", "--world", "2", "--start-step", "0",
                     "--steps", "40"]) == 0
    finally:
        dumping.clear()
        watcher.join(10)
    assert len(seen) >= 2
    for (slow_a, rank0_a), (slow_b, rank0_b) in zip(seen, seen[1:]):
        assert slow_b >= slow_a and rank0_b >= rank0_a, seen
    assert seen[0][1] >= 20
    out = capsys.readouterr().out
    ref = reference(40)
    for step in (0, 17, 39):
        line = next(x for x in out.splitlines() if x.startswith(f"step {step}\t"))
        assert line.split("\t")[1].split()[:3] == [str(i) for i in ref[step][:B // 2][:3].tolist()]
    for t in trainers:
        t.join(60)  # bound: the remaining steps in 60 s
    check_exact(trainers, steps)


def test_stopped_reader_and_silent_rank_stop_holding_others_back(serve, closing) -> None:
    job = make_job(rank_timeout_s=1.0)
    server, address = serve(job)
    ch = closing.enter_context(grpc.insecure_channel(address, options=channel_options()))
    stub = pb2_grpc.SamplerStub(ch)
    stub.Join(pb2.JoinRequest(rank=1, world_size=2), timeout=5)
    # Rank 1 opens 16 training streams and never reads them, nor acknowledges anything.
    stopped = [stub.StreamSlices(pb2.StreamSlicesRequest(rank=1, world_size=2, step_stride=16, step_offset=w),
                                 timeout=60) for w in range(16)]
    trainer = Trainer(address, 0, 2, 60)
    trainer.start()
    trainer.join(30)  # bound: 60 steps (max lag 8) in 30 s, i.e. past the 1 s liveness timeout
    assert not trainer.is_alive() and trainer.error is None and sorted(trainer.got) == list(range(60))
    st = stub.GetStatus(pb2.GetStatusRequest(), timeout=5)
    r1 = next(r for r in st.ranks if r.rank == 1)
    assert not r1.live and r1.next_step == 0 and st.slowest_step == 60
    assert "croupier_silent_ranks 1.0" in generate_latest(ServerMetrics(job).registry).decode()
    # Rank 1 comes back: re-admitted at its position, and it holds the others again.
    stub.Ack(pb2.AckRequest(rank=1, world_size=2, next_step=0), timeout=5)
    st = stub.GetStatus(pb2.GetStatusRequest(), timeout=5)
    assert next(r for r in st.ranks if r.rank == 1).live and st.slowest_step == 0
    for call in stopped:
        call.cancel()
    ch.close()


def test_vanished_rank_is_reported_and_readmitted(serve, closing) -> None:
    job = make_job(rank_timeout_s=1.0)
    _, address = serve(job)
    a, b = closing.enter_context(rank_client(address, 0, 2)), closing.enter_context(rank_client(address, 1, 2))
    for _ in range(5):
        a.next_slice(timeout=10)
        b.next_slice(timeout=10)
    b.close()  # rank 1 vanishes at step 5
    for _ in range(40):
        a.next_slice(timeout=10)  # each step must come: a rank held back by the vanished one times out
    st = job.status()
    assert [r.live for r in st.ranks] == [True, False] and st.ranks[1].next_step == 5
    again = closing.enter_context(rank_client(address, 1, 2))
    assert again.next_slice(timeout=10)[0] == 5  # it resumes at its position
    assert job.status().ranks[1].live
    a.close()
    again.close()


class Disk:
    """Checkpoint-writer fault hook: raises the chosen errno while `broken`."""

    def __init__(self) -> None:
        self.errno: int | None = None
        self.calls = 0

    def __call__(self, path: Path) -> None:
        self.calls += 1
        if self.errno is not None:
            raise OSError(self.errno, f"injected: {errno.errorcode[self.errno]}", str(path))


@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC])
def test_failing_checkpoint_writes_never_fail_a_rank(serve, closing, tmp_path, caplog, code) -> None:
    disk = Disk()
    job = closing.enter_context(Job(ClusterLayout.from_sizes(SIZES), CONFIG, B,
                                    spec=JobSpec(max_lag=8, max_lookahead=4, checkpoint_every=5),
                                    store=CheckpointStore(tmp_path), fault_hook=disk))
    _, address = serve(job)
    health = health_pb2_grpc.HealthStub(closing.enter_context(grpc.insecure_channel(address)))
    trainers = [Trainer(address, r, 2, 200) for r in range(2)]
    disk.errno = code
    with caplog.at_level(logging.ERROR, logger="croupier"):
        for t in trainers:
            t.start()
        for t in trainers:
            t.join(60)  # bound: 200 steps across 40 failing automatic checkpoints in 60 s
        st = job.status()
        assert st.checkpoint is not None and not st.checkpoint.ok and st.checkpoint.failures >= 1
        assert f"[errno {code}]" in st.checkpoint.error and str(tmp_path) in st.checkpoint.error
        wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service=CHECKPOINT_HEALTH), timeout=5).status
                 == health_pb2.HealthCheckResponse.NOT_SERVING, 10, "checkpoint health NOT_SERVING")
        client = closing.enter_context(rank_client(address, 0, 2, backoff=Backoff(initial_s=0.05, max_s=0.2,
                                                                                  give_up_after_s=1.5)))
        with pytest.raises(Unavailable, match="cannot write checkpoint"):
            client.checkpoint(step=200)
        client.close()
    check_exact(trainers, 200)
    text = generate_latest(ServerMetrics(job).registry).decode()
    assert "croupier_checkpoint_healthy 0.0" in text and "croupier_checkpoint_failures_total" in text
    failed = [r for r in caplog.records if getattr(r, "event", "") == "checkpoint_failed"]
    assert failed and all(r.errno == code and str(tmp_path) in r.path for r in failed)
    assert len(failed) <= job.status().checkpoint.failures  # logged at most once per retry window
    disk.errno = None  # the disk is back
    wait_for(lambda: job.status().checkpoint.ok, 40, "recovery after the retry backoff")
    wait_for(lambda: health.Check(health_pb2.HealthCheckRequest(service=CHECKPOINT_HEALTH), timeout=5).status
             == health_pb2.HealthCheckResponse.SERVING, 10, "checkpoint health SERVING")
    assert job.status().durable_step >= 5


def test_state_dir_deleted_while_serving(serve, closing, tmp_path) -> None:
    state = tmp_path / "state"
    job = closing.enter_context(make_job(CheckpointStore(state), checkpoint_every=5))
    _, address = serve(job)
    a = closing.enter_context(rank_client(address, 0, 1))
    for _ in range(10):
        a.next_slice(timeout=10)
    while state.exists():  # a real fault: the directory is gone under the running server (which
        shutil.rmtree(state, ignore_errors=True)  # may be writing into it at that very moment)
    for _ in range(60):
        a.next_slice(timeout=10)
    wait_for(lambda: not job.status().checkpoint.ok, 10, "the failure to show in status")
    assert "No such file or directory" in job.status().checkpoint.error
    state.mkdir()
    wait_for(lambda: job.status().checkpoint.ok, 40, "recovery once the directory is back")
    a.close()


def test_restart_without_any_checkpoint_accepts_ranks_up_to_the_mark(tmp_path, closing) -> None:
    """Killed before the first automatic checkpoint: the mark alone lets ranks reconnect."""
    job = closing.enter_context(make_job(CheckpointStore(tmp_path), checkpoint_every=1000))
    job.join(0, 1)
    for t in range(416):
        get_slice(job, 0, 1, t)
        job.ack(0, 1, t + 1)
    job.flush()  # what a kill -9 leaves: the mark, no checkpoint file
    assert CheckpointStore(tmp_path).steps() == [0] or CheckpointStore(tmp_path).steps() == []
    again = closing.enter_context(make_job(CheckpointStore(tmp_path), checkpoint_every=1000))
    again.join(0, 1)
    again.ack(0, 1, 416)
    assert np.array_equal(get_slice(again, 0, 1, 416).ids, reference(417)[416])


def test_reconnecting_client_refuses_a_server_of_another_dataset(serve, closing) -> None:
    port = free_port()
    first, address = serve(make_job(), f"127.0.0.1:{port}")
    client = closing.enter_context(rank_client(address, 0, 1))
    for _ in range(3):
        client.next_slice(timeout=10)
    first.stop(0, checkpoint=False)
    serve(make_job(sizes=[400, 100, 50, 33]), f"127.0.0.1:{port}")  # same shape of job, another dataset
    with pytest.raises(FingerprintMismatch, match="sampler"):
        for _ in range(50):
            client.next_slice(timeout=20)


def test_overflowing_clip_and_weights_are_refused_everywhere(capsys) -> None:
    big = 2 ** 62
    base = ["simulate", "--cluster-sizes", "100,10", "--global-batch", "8", "--steps", "3"]
    assert main([*base, "--policy", "clusterclip", "--clip", str(big)]) == 2
    assert f"clip {big} × 110 samples = {big * 110}" in capsys.readouterr().err
    assert main([*base, "--policy", "weighted", "--weights", "1e308,1e308"]) == 2
    assert "weights must have a finite sum; they sum to inf" in capsys.readouterr().err
    assert main([*base, "--policy", "weighted", "--weights", "nan,1"]) == 2
    assert "weights must be finite numbers, got nan" in capsys.readouterr().err
    assert main([*base, "--policy", "weighted", "--weights", "0,0"]) == 2
    assert "at least one weight must be > 0" in capsys.readouterr().err
    lay = ClusterLayout.from_sizes([100, 10])
    with pytest.raises(ConfigError, match=rf"clip {big // 110 + 1} × 110 samples = {(big // 110 + 1) * 110}"):
        Job(lay, PolicyConfig("clusterclip", clip=big // 110 + 1), 8)
    job = Job(lay, PolicyConfig("weighted", weights=(1.0, 1.0), clip=3), 8)
    with pytest.raises(ConfigError, match="clip × total samples must be < 2"):
        job.update(step=0, clip=big)
    with pytest.raises(ConfigError, match="finite sum"):
        job.update(step=0, weights=[1e308, 1e308])
    # Valid inputs keep the arithmetic: a large but legal clip draws as before.
    ok = Sampler(lay, PolicyConfig("clusterclip", clip=big // 110 - 1), 8)
    assert len(ok.next_batch()) == 8
