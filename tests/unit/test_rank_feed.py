"""A rank feed (one server lane per rank on a node agent) hands each DataLoader worker its steps
and acknowledges the rank's position only once every worker consumed up to it."""

from __future__ import annotations

from croupier.client.rank_feed import RankFeed
from croupier.proto import pack_ids, pb2


def sl(step: int) -> pb2.Slice:
    return pb2.Slice(step=step, kind=pb2.SLICE_KIND_DATA, packed_ids=pack_ids(__import__("numpy").array([step])))


def op(worker: int, workers: int, start: int = 0, stop: int = 0) -> pb2.LaneOpen:
    return pb2.LaneOpen(rank=0, world_size=1, start_step=start + worker, lookahead=8, step_stride=workers,
                        step_offset=worker, stop_step=stop)


def steps(out) -> list[int]:
    return [s.step for s in out]


def test_workers_get_their_steps_and_late_workers_are_served_from_the_buffer() -> None:
    feed = RankFeed(rank=0, world=1, lane=1, start=0, lookahead=8)
    assert feed.add((b"a", 1), op(0, 2)) == []
    got = feed.on_slices([sl(t) for t in range(6)])
    assert steps(got[(b"a", 1)]) == [0, 2, 4]
    # worker 1 opens later: its steps come from what the feed kept
    assert steps(feed.add((b"b", 1), op(1, 2))) == [1, 3, 5]
    got = feed.on_slices([sl(6), sl(7)])
    assert steps(got[(b"a", 1)]) == [6] and steps(got[(b"b", 1)]) == [7]


def test_position_waits_for_every_worker_and_is_the_minimum_over_them() -> None:
    feed = RankFeed(rank=0, world=1, lane=1, start=0, lookahead=8)
    feed.add((b"a", 1), op(0, 2))
    feed.on_slices([sl(t) for t in range(8)])
    # Only worker 0 has opened: acknowledging its steps must not claim worker 1's.
    assert feed.ack((b"a", 1), 5) is None
    feed.add((b"b", 1), op(1, 2))
    assert feed.ack((b"b", 1), 2) == 3  # worker 1 consumed step 1; worker 0 up to 4: step 3 is next
    assert feed.ack((b"b", 1), 2) is None  # unchanged: nothing to send
    assert feed.ack((b"b", 1), 8) == 6  # worker 0 still owes step 6
    assert min(feed.buffer) == 6  # steps below the rank's position are dropped


def test_an_earlier_start_or_a_later_stop_reopens_the_server_lane() -> None:
    feed = RankFeed(rank=0, world=1, lane=1, start=3, lookahead=8, stop=10)
    feed.add((b"a", 1), op(1, 2, start=2, stop=10))
    assert feed.needs_reopen(2, 10)  # a worker starting at step 2 is owed a step the lane never asked for
    assert feed.needs_reopen(3, 12) and feed.needs_reopen(3, 0)  # or steps past the lane's stop
    assert not feed.needs_reopen(3, 10)
    feed.reopen(2, 2, 12)
    assert (feed.lane, feed.start, feed.stop) == (2, 2, 12)


def test_end_of_data_reaches_every_worker_at_its_next_step() -> None:
    feed = RankFeed(rank=0, world=1, lane=1, start=0, lookahead=8)
    feed.add((b"a", 1), op(0, 2))
    feed.add((b"b", 1), op(1, 2))
    got = feed.on_slices([sl(0), sl(1), sl(2), pb2.Slice(step=3, kind=pb2.SLICE_KIND_END_OF_DATA)])
    assert [(s.step, s.kind) for s in got[(b"a", 1)]] == [(0, 1), (2, 1), (4, 2)]
    assert [(s.step, s.kind) for s in got[(b"b", 1)]] == [(1, 1), (3, 2)]


# -- the node lane: an agent opens one server lane for the ranks whose lanes open together ----------
def rank_op(rank: int, world: int = 8, start: int = 0) -> pb2.LaneOpen:
    return pb2.LaneOpen(lane=1, rank=rank, world_size=world, start_step=start, lookahead=4, step_stride=1)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lane_table(local_ranks: int, cache=None, clock=None):
    from croupier.client.agent.lanes import LaneTable

    return LaneTable("agent0", local_ranks, cache=lambda: cache, session_open=lambda: True,
                     clock=clock or Clock())


def test_consecutive_ranks_open_one_lane_and_a_leaving_rank_regroups_the_others() -> None:
    import numpy as np

    from croupier.client.agent.lanes import per_rank
    from croupier.proto import slice_ids

    table = lane_table(local_ranks=4)
    for r in (0, 1, 2, 5):
        assert table.on_request(f"c{r}".encode(), pb2.SessionRequest(open=[rank_op(r)])) == pb2.SessionResponse()
    req, wait = table.next_request()
    assert wait is None  # all 4 local ranks are there: no wait
    assert [(o.rank, o.rank_count, o.start_step) for o in req.open] == [(0, 3, 0), (5, 0, 0)]
    group = req.open[0].lane
    assert (table.lane_count, table.rank_count) == (2, 4)
    # the lane's slices split into each rank's, in rank order
    ids = np.arange(30, dtype=np.int64)
    parts = per_rank([pb2.Slice(step=0, packed_ids=pack_ids(ids))], 3)
    assert [slice_ids(p[0]).tolist() for p in parts] == [ids[:10].tolist(), ids[10:20].tolist(), ids[20:].tolist()]
    end = per_rank([pb2.Slice(step=7, kind=pb2.SLICE_KIND_END_OF_DATA)], 3)
    assert [p[0].kind for p in end] == [pb2.SLICE_KIND_END_OF_DATA] * 3
    # per-rank acknowledgements of the group: the consumers' acks are confirmed at once
    for r, step in ((0, 3), (2, 2)):
        out = table.on_request(f"c{r}".encode(), pb2.SessionRequest(acks=[pb2.LaneAck(lane=1, next_step=step)]))
        assert [(e.lane, e.acked_step, e.error_code) for e in out.events] == [(1, step, "")]
    req, _ = table.next_request()
    assert [(a.lane, a.next_step, list(a.rank_steps)) for a in req.acks] == [(group, 0, [3, 0, 2])]
    # rank 1 leaves: the lane closes and ranks 0 and 2 (no longer consecutive) re-open on their own
    table.on_request(b"c1", pb2.SessionRequest(close=[1]))
    req, wait = table.next_request()
    assert list(req.close) == [group]
    assert wait is None  # re-opens never wait
    assert [(o.rank, o.rank_count, o.start_step) for o in req.open] == [(0, 0, 0), (2, 0, 0)]
    # an acknowledgement of a lane the agent does not know (it restarted) is refused at once
    out = table.on_request(b"c9", pb2.SessionRequest(acks=[pb2.LaneAck(lane=4, next_step=1)]))
    assert [(e.lane, e.error_code) for e in out.events] == [(4, "UNAVAILABLE")]


def test_new_ranks_wait_for_the_node_but_not_forever() -> None:
    from croupier.client.agent.lanes import OPEN_WAIT_S

    clock = Clock()
    table = lane_table(local_ranks=2, clock=clock)
    table.on_request(b"c0", pb2.SessionRequest(open=[rank_op(0, world=2)]))
    req, wait = table.next_request()
    assert wait is not None and 0 < wait <= OPEN_WAIT_S and not req.open
    clock.now += OPEN_WAIT_S  # the other rank never came
    req, wait = table.next_request()
    assert wait is None
    assert [(o.rank, o.rank_count) for o in req.open] == [(0, 0)]


def test_a_lost_session_tells_every_consumer_and_empties_the_table() -> None:
    table = lane_table(local_ranks=0)
    table.on_request(b"c0", pb2.SessionRequest(open=[rank_op(0, world=2)]))
    table.on_request(b"c1", pb2.SessionRequest(open=[rank_op(1, world=2, start=0)]))
    table.on_request(b"dump", pb2.SessionRequest(open=[pb2.LaneOpen(lane=3, rank=0, world_size=1, read_only=True)]))
    out = table.lose("server gone")
    assert sorted(out) == [b"c0", b"c1", b"dump"]
    assert {(e.lane, e.error_code) for m in out.values() for e in m.events} == {(1, "UNAVAILABLE"), (3, "UNAVAILABLE")}
    assert (table.lane_count, table.rank_count) == (0, 0) and not table.has_lanes(b"c0")
    req, wait = table.next_request()
    assert not (req.open or req.acks or req.close) and wait is None


def test_a_node_lanes_needs_reach_the_cache_step_by_step_across_ranks() -> None:
    """A message carries several steps of several ranks; the node cache ranks shards by when they
    are first needed, so the needs go in the order the node reads them: step 0 of every rank,
    then step 1, not all of rank 0's steps first."""
    import numpy as np

    class Needs:
        def __init__(self) -> None:
            self.order: list[tuple[int, int]] = []

        def prefetch_slices(self, lane: int, slices, rank: int = 0) -> None:
            assert lane == group
            self.order.extend((int(s.step), rank) for s in slices)

    needs = Needs()
    table = lane_table(local_ranks=2, cache=needs)
    for r in (0, 1):
        table.on_request(f"c{r}".encode(), pb2.SessionRequest(open=[rank_op(r, world=2)]))
    req, wait = table.next_request()
    assert wait is None
    group = req.open[0].lane
    resp = pb2.SessionResponse()
    resp.lanes.add(lane=group, slices=[pb2.Slice(step=t, packed_ids=pack_ids(np.arange(4) + 10 * t))
                                       for t in range(3)])
    out = table.dispatch(resp)
    assert needs.order == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert sorted(out) == [b"c0", b"c1"]  # and each rank's worker got its slices
    assert [[s.step for s in ls.slices] for ls in out[b"c0"].lanes] == [[0, 1, 2]]
