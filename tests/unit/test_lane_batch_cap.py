"""A node agent's server lane carries several ranks' slices in one slice per step, and a slice
travels whole in one gRPC message: the agent groups no more ranks into a lane than the
message limit holds (`croupier.bounds.MAX_RANK_BATCH` ids together)."""

from __future__ import annotations

from croupier import bounds
from croupier.client.agent.lanes import LaneTable
from croupier.proto import pb2


def opens(rank_batch: int, ranks: int = 8) -> list[tuple[int, int]]:
    table = LaneTable("agent0", ranks, cache=lambda: None, session_open=lambda: True, clock=lambda: 1000.0)
    table.rank_batch = rank_batch
    for r in range(ranks):
        op = pb2.LaneOpen(lane=1, rank=r, world_size=ranks, lookahead=4, step_stride=1)
        table.on_request(f"c{r}".encode(), pb2.SessionRequest(open=[op]))
    req, wait = table.next_request()
    assert wait is None
    return [(o.rank, o.rank_count) for o in req.open]


def test_small_batches_share_one_lane_per_node() -> None:
    assert opens(rank_batch=16) == [(0, 8)]
    assert opens(rank_batch=0) == [(0, 8)]  # before any Join: not known, not capped


def test_big_batches_split_the_node_into_lanes_that_fit_a_message() -> None:
    per_lane = 3
    rank_batch = bounds.MAX_RANK_BATCH // per_lane  # three ranks' slices fill a message
    assert opens(rank_batch) == [(0, 3), (3, 3), (6, 2)]
    assert opens(bounds.MAX_RANK_BATCH) == [(r, 0) for r in range(8)]  # one rank per lane
