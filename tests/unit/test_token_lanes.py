"""Steps in tokens through a node agent's lane: a lane of several ranks carries their parts one
after another, and the agent's split (`client.agent.lanes.per_rank`) gives every rank exactly
the slice (ids and token spans) it gets on its own, each exactly G / world tokens."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from cases.session import Session
from croupier.client.agent.lanes import per_rank
from croupier.grpc_options import channel_options
from croupier.layout import ClusterLayout
from croupier.proto import pb2, pb2_grpc, slice_ids, slice_spans
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.token_stream import TokenSchedule, mean_stream_tokens, plan_tokens
from croupier.server.serving.service import create_server

SIZES = [400, 120, 30, 6]
WORLD = 4
TOKENS = 1024
STEPS = 8


@pytest.fixture
def token_job():
    layout = ClusterLayout.from_sizes(SIZES)
    counts = (np.arange(layout.num_samples) * 37 % 211 + 5).astype(np.int64)  # 5..215 tokens a document
    schedule = TokenSchedule.constant(TOKENS)
    chunk, policy = plan_tokens(schedule, mean_stream_tokens(counts, layout.ids_at(np.arange(layout.num_positions))),
                                None, PolicyConfig.from_options(policy="clusterclip", clip=3))
    job = Job(layout, policy, chunk, 1, spec=JobSpec(name="tok", max_lag=8, max_lookahead=4),
              tokens=(schedule, [(0, counts)], chunk))
    server, port = create_server(job, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options())
    stub = pb2_grpc.SamplerStub(channel)
    for r in range(WORLD):
        stub.Join(pb2.JoinRequest(job="tok", rank=r, world_size=WORLD), timeout=10)
    yield stub
    channel.close()
    server.stop(0, checkpoint=False)


def lane_slices(stub, rank: int, count: int) -> dict[int, pb2.Slice]:
    s = Session(stub, job="tok")
    try:
        s.send(open=[pb2.LaneOpen(lane=1, rank=rank, world_size=WORLD, start_step=0, lookahead=4, rank_count=count,
                                  stop_step=STEPS)])
        got: dict[int, pb2.Slice] = {}
        acked = 0
        deadline = time.monotonic() + 30
        while len(got) < STEPS:
            resp = s.read(timeout=max(deadline - time.monotonic(), 0.0))
            assert resp is not None, f"steps {sorted(got)} within 30 s"
            for ls in resp.lanes:
                for sl in ls.slices:
                    got[sl.step] = sl
            if len(got) > acked:
                acked = len(got)
                s.send(acks=[pb2.LaneAck(lane=1, next_step=acked, rank_steps=[acked] * count)])
        return got
    finally:
        s.close()


def test_a_lane_of_ranks_splits_into_exactly_each_ranks_own_slice(token_job) -> None:
    stub = token_job
    own = {(t, r): stub.GetSlice(pb2.GetSliceRequest(rank=r, world_size=WORLD, step=t), timeout=10).slice
           for t in range(STEPS) for r in range(WORLD)}
    for first, count in ((0, WORLD), (2, 2)):
        lane = lane_slices(stub, first, count)
        assert sorted(lane) == list(range(STEPS))
        for t in range(STEPS):
            parts = per_rank([lane[t]], count)
            for i, part in enumerate(parts):
                (sl,) = part
                want = own[(t, first + i)]
                ids = slice_ids(sl)
                assert np.array_equal(ids, slice_ids(want)), (t, first + i)
                spans = slice_spans(sl, len(ids))
                assert spans == slice_spans(want, len(ids))
                assert spans is not None and sum(b - a for a, b, _ in spans) == TOKENS // WORLD


def test_a_slice_whose_tokens_do_not_split_evenly_is_refused_by_name() -> None:
    spans = np.array([(0, 5, 9), (0, 4, 4)], dtype="<i8")
    sl = pb2.Slice(step=3, packed_ids=np.array([7, 8], dtype="<i8").tobytes(), packed_token_spans=spans.tobytes())
    with pytest.raises(ValueError, match="slice of step 3 holds 9 tokens, not a multiple of its 2 ranks"):
        per_rank([sl], 2)
    bad = pb2.Slice(step=4, packed_ids=np.array([7, 8], dtype="<i8").tobytes(),
                    packed_token_spans=np.array([(0, 3, 9), (0, 5, 5)], dtype="<i8").tobytes())
    with pytest.raises(ValueError, match="do not end on 4-token boundaries"):
        per_rank([bad], 2)
