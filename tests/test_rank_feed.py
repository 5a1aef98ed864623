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
