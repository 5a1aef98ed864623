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


def test_consecutive_ranks_open_one_lane_and_a_leaving_rank_regroups_the_others(tmp_path) -> None:
    import numpy as np

    from croupier.client.agent.daemon import NodeAgent, _Consumer, _per_rank
    from croupier.proto import slice_ids

    agent = NodeAgent("127.0.0.1:1", tmp_path / "run", tmp_path / "cache", local_ranks=4)
    consumers = {r: _Consumer(f"c{r}".encode()) for r in (0, 1, 2, 5)}
    for r, c in consumers.items():
        c.lanes[1] = (r, 8)
        agent._join_feed((r, 8), (c.identity, 1), rank_op(r))
    assert agent._take_opens() is None  # all 4 local ranks are there: no wait
    opens = [(o.rank, o.rank_count, o.start_step) for o in agent._pending.open]
    assert opens == [(0, 3, 0), (5, 0, 0)]
    group = agent._pending.open[0].lane
    assert [f.rank for f in agent._feed_lanes[group]] == [0, 1, 2]
    # the lane's slices split into each rank's, in rank order
    ids = np.arange(30, dtype=np.int64)
    parts = _per_rank([pb2.Slice(step=0, packed_ids=pack_ids(ids))], 3)
    assert [slice_ids(p[0]).tolist() for p in parts] == [ids[:10].tolist(), ids[10:20].tolist(), ids[20:].tolist()]
    end = _per_rank([pb2.Slice(step=7, kind=pb2.SLICE_KIND_END_OF_DATA)], 3)
    assert [p[0].kind for p in end] == [pb2.SLICE_KIND_END_OF_DATA] * 3
    # per-rank acknowledgements of the group
    agent._feeds[(0, 8)].sent_position, agent._feeds[(2, 8)].sent_position = 3, 2
    ack = agent._lane_ack(group, 3)
    assert (ack.next_step, list(ack.rank_steps)) == (0, [3, 0, 2])
    # rank 1 leaves: the lane closes and ranks 0 and 2 (no longer consecutive) re-open on their own
    agent._pending = pb2.SessionRequest()
    agent._session = object()  # a session is open: the close goes to the server
    agent._close_route(consumers[1], 1, (1, 8))
    assert list(agent._pending.close) == [group] and group not in agent._feed_lanes
    assert agent._take_opens() is None  # re-opens never wait
    assert [(o.rank, o.rank_count, o.start_step) for o in agent._pending.open] == [(0, 0, 0), (2, 0, 0)]


def test_new_ranks_wait_for_the_node_but_not_forever(tmp_path) -> None:
    from croupier.client.agent import daemon as agent_mod
    from croupier.client.agent.daemon import NodeAgent

    agent = NodeAgent("127.0.0.1:1", tmp_path / "run", tmp_path / "cache", local_ranks=2)
    agent._join_feed((0, 2), (b"c0", 1), rank_op(0, world=2))
    wait = agent._take_opens()
    assert wait is not None and 0 < wait <= agent_mod.OPEN_WAIT_S and not agent._pending.open
    agent._opens_first -= agent_mod.OPEN_WAIT_S  # the other rank never came
    assert agent._take_opens() is None
    assert [(o.rank, o.rank_count) for o in agent._pending.open] == [(0, 0)]


def test_a_node_lanes_needs_reach_the_cache_step_by_step_across_ranks(tmp_path) -> None:
    """A message carries several steps of several ranks; the node cache ranks shards by when they
    are first needed, so the needs go in the order the node reads them: step 0 of every rank,
    then step 1, not all of rank 0's steps first."""
    import asyncio

    import numpy as np

    from croupier.client.agent.daemon import NodeAgent, _Consumer

    agent = NodeAgent("127.0.0.1:1", tmp_path / "run", tmp_path / "cache", local_ranks=2)
    for r in (0, 1):
        c = _Consumer(f"c{r}".encode())
        c.lanes[1] = (r, 2)
        agent._consumers[c.identity] = c
        agent._join_feed((r, 2), (c.identity, 1), rank_op(r, world=2))
    assert agent._take_opens() is None
    group = agent._pending.open[0].lane

    class Needs:
        def __init__(self) -> None:
            self.order: list[tuple[int, int]] = []

        def prefetch_slices(self, lane: int, slices, rank: int = 0) -> None:
            assert lane == group
            self.order.extend((int(s.step), rank) for s in slices)

    agent.cache = needs = Needs()
    sent: list = []

    async def send(identity, frames) -> None:
        sent.append(identity)

    agent._send = send
    resp = pb2.SessionResponse()
    resp.lanes.add(lane=group, slices=[pb2.Slice(step=t, packed_ids=pack_ids(np.arange(4) + 10 * t))
                                       for t in range(3)])

    async def dispatch() -> None:
        agent._dispatch(resp)
        await asyncio.sleep(0)

    asyncio.run(dispatch())
    assert needs.order == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert sorted(sent) == [b"c0", b"c1"]  # and each rank's worker got its slices
