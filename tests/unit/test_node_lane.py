"""Lanes of several ranks (what a node agent opens for its node), over a real server's Session."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from cases.session import Session
from croupier.grpc_options import channel_options
from croupier.layout import ClusterLayout
from croupier.proto import pb2, pb2_grpc, slice_ids
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.serving.service import create_server

SIZES = [5000, 300, 20, 1]
B = 64
WORLD = 4
P = B // WORLD
LOOKAHEAD = 4


def reference(n: int) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0)
    return [s.next_batch() for _ in range(n)]


@pytest.fixture
def served():
    job = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0,
              spec=JobSpec(name="demo", max_lag=8, max_lookahead=LOOKAHEAD))
    server, port = create_server(job, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    stub = pb2_grpc.SamplerStub(channel)
    for r in range(WORLD):
        stub.Join(pb2.JoinRequest(job="demo", rank=r, world_size=WORLD), timeout=10)
    sessions: list[Session] = []

    def open_session() -> Session:
        s = Session(stub)
        sessions.append(s)
        return s

    yield job, stub, open_session
    for s in sessions:
        s.close()
    channel.close()
    server.stop(0, checkpoint=False)


def read_until(s: Session, got: dict[int, np.ndarray], done: Callable[[list[pb2.LaneEvent]], bool], lane: int = 1,
               timeout: float = 30.0) -> list[pb2.LaneEvent]:
    """Reads messages until `done(events read)` holds; slices of `lane` go into got (a step twice
    fails), the events read are returned. The server sends an acknowledgement's confirmation
    with, or after, every slice the acknowledgement released, so once it is read the lane holds
    all it will receive until the next acknowledgement."""
    events: list[pb2.LaneEvent] = []
    deadline = time.monotonic() + timeout
    while not done(events):
        resp = s.read(timeout=max(deadline - time.monotonic(), 0.0))
        assert resp is not None, f"nothing more within {timeout} s: steps {sorted(got)}, events {events}"
        for ls in resp.lanes:
            if ls.lane == lane:
                for sl in ls.slices:
                    assert sl.step not in got, f"step {sl.step} delivered twice"
                    got[sl.step] = slice_ids(sl)
        events.extend(resp.events)
    return events


def confirmed(lane: int, step: int) -> Callable[[list[pb2.LaneEvent]], bool]:
    """Until the server confirmed the lane's acknowledgement of `step`."""
    return lambda events: any(e.lane == lane and e.acked_step == step and not e.error_code for e in events)


def steps(got: dict[int, np.ndarray], n: int) -> Callable[[list[pb2.LaneEvent]], bool]:
    """Until the lane received n steps."""
    return lambda events: len(got) >= n


def test_a_lane_of_all_ranks_carries_their_slices_in_rank_order(served) -> None:
    job, stub, open_session = served
    s = open_session()
    s.send(open=[pb2.LaneOpen(lane=1, rank=0, world_size=WORLD, start_step=0, lookahead=LOOKAHEAD, rank_count=WORLD,
                              stop_step=12)])
    got: dict[int, np.ndarray] = {}
    for target in range(LOOKAHEAD, 13, LOOKAHEAD):
        read_until(s, got, steps(got, target))
        assert sorted(got) == list(range(target))
        s.send(acks=[pb2.LaneAck(lane=1, next_step=target, rank_steps=[target] * WORLD)])
    read_until(s, got, confirmed(1, 12))
    ref = reference(12)
    assert sorted(got) == list(range(12))
    for t in range(12):
        assert len(got[t]) == B
        assert np.array_equal(got[t], ref[t])  # ranks 0..3 one after another = the global batch
    st = stub.GetStatus(pb2.GetStatusRequest(), timeout=10)
    assert [(x.ranks, x.lanes) for x in st.sessions] == [([0, 1, 2, 3], 1)]


def test_flow_control_holds_per_rank_of_the_lane(served) -> None:
    job, stub, open_session = served
    s = open_session()
    s.send(open=[pb2.LaneOpen(lane=1, rank=2, world_size=WORLD, start_step=0, lookahead=LOOKAHEAD, rank_count=2)])
    got: dict[int, np.ndarray] = {}
    read_until(s, got, steps(got, LOOKAHEAD))
    ref = reference(LOOKAHEAD + 2)
    assert np.array_equal(got[0], ref[0][2 * P:4 * P])  # ranks 2 and 3
    # rank 2 consumed 2 steps, rank 3 none: rank 3 holds the lane at its own window
    s.send(acks=[pb2.LaneAck(lane=1, next_step=0, rank_steps=[2, 0])])
    events = read_until(s, got, confirmed(1, 0))
    assert [(e.lane, e.acked_step, e.error_code) for e in events] == [(1, 0, "")]
    assert sorted(got) == list(range(LOOKAHEAD))
    positions = {r.rank: r.next_step for r in stub.GetStatus(pb2.GetStatusRequest(), timeout=10).ranks}
    assert positions[2] == 2 and positions[3] == 0
    s.send(acks=[pb2.LaneAck(lane=1, next_step=2, rank_steps=[2, 2])])
    events = read_until(s, got, confirmed(1, 2))
    assert [(e.lane, e.acked_step, e.error_code) for e in events] == [(1, 2, "")]
    assert sorted(got) == list(range(LOOKAHEAD + 2))
    assert np.array_equal(got[LOOKAHEAD + 1], ref[LOOKAHEAD + 1][2 * P:4 * P])


def test_bad_lanes_of_several_ranks_are_refused_with_the_rule_and_the_others_go_on(served) -> None:
    job, stub, open_session = served
    s = open_session()
    s.send(open=[pb2.LaneOpen(lane=1, rank=0, world_size=WORLD, start_step=0, lookahead=LOOKAHEAD, rank_count=2),
                 pb2.LaneOpen(lane=2, rank=3, world_size=WORLD, start_step=0, lookahead=LOOKAHEAD, rank_count=2),
                 pb2.LaneOpen(lane=3, rank=2, world_size=WORLD, start_step=0, lookahead=LOOKAHEAD, rank_count=-1)])
    got: dict[int, np.ndarray] = {}
    events = read_until(s, got, lambda events: len(got) >= LOOKAHEAD and len(events) >= 2)
    refused = {e.lane: (e.error_code, e.error) for e in events if e.error_code}
    assert sorted(refused) == [2, 3] and len(events) == 2
    assert refused[2][0] == "INVALID_ARGUMENT" and "ranks 3..4" in refused[2][1] and "world size 4" in refused[2][1]
    assert refused[3][0] == "INVALID_ARGUMENT" and "rank count must be >= 0" in refused[3][1] and "-1" in refused[3][1]
    assert sorted(got) == list(range(LOOKAHEAD))  # lane 1 streams meanwhile
    s.send(acks=[pb2.LaneAck(lane=1, next_step=2, rank_steps=[2, 2, 2])])
    events = read_until(s, got, lambda events: any(e.lane == 1 for e in events))
    assert [(e.lane, e.error_code) for e in events] == [(1, "INVALID_ARGUMENT")]
    assert "one step per rank: lane 1 got 3 rank steps" in events[0].error
