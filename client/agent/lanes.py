"""The node agent's lanes: every consumer lane of the node mapped onto the one server session.

A consumer (a rank, or one DataLoader worker of a rank) opens lanes by its own lane ids. The
agent maps each onto a lane of its session with the server:

- a read-only lane (`croupier client dump`) passes through: one server lane per consumer
  lane, its slices and events forwarded as they are;
- a training lane joins its rank's `RankFeed` (`croupier.client.rank_feed`): one server lane
  per rank, shared by the rank's DataLoader workers, acknowledged for them all. Feeds that
  open together are grouped: consecutive ranks of one world and stop share one server lane
  (`rank_count`), so the server's work per step follows nodes, not ranks; a lane carries no
  more ranks than one gRPC message holds slices of (`max_ranks_per_lane`). New feeds wait for
  the node's other ranks (`local_ranks`, else a short settling time), never past
  `OPEN_WAIT_S`.

`LaneTable` holds that mapping and what the next session message carries (opens, aggregated
acknowledgements, closes). It does no I/O: the agent hands it consumer requests
(`on_request`) and server responses (`dispatch`), and sends what they return; its writer
takes the next session message from `next_request`. The node cache (when open) hears each
slice as a need, in the order the node reads them, and each acknowledgement as a release.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from croupier import bounds
from croupier.client.rank_feed import RankFeed
from croupier.proto import pack_ids, pb2, slice_ids

OPEN_SETTLE_S = 0.2
"""New rank feeds wait this long after the latest one for more to open in the same node lane
(when the node's rank count is not known)."""
OPEN_WAIT_S = 10.0
"""The most a new rank feed waits for the node's other ranks before its lane opens anyway."""
ACK_SHARE = 4
"""A node lane's acknowledgement goes to the server when its slowest rank moved a quarter of
the lookahead (at least one step): the server still holds three quarters of the window to
send meanwhile, and the node's acks cost the server a message every few steps, not several
per step."""
HEARTBEAT_S = 5.0
"""A rank feed re-sends an unchanged position at most this often (the rank stays live)."""

Route = Union[int, tuple[int, int]]
"""Where a consumer lane goes: a pass-through server lane, or the (rank, world) of its feed."""
Outbox = dict[bytes, pb2.SessionResponse]
"""Session messages to send, by consumer identity."""


@dataclass
class _PassThrough:
    """A read-only consumer lane, carried by a server lane of its own."""

    consumer: bytes
    local: int
    rank: int


class LaneTable:
    """The lanes of one node agent (see the module docstring). Not thread-safe: the agent's
    event loop makes every call.

    agent_id: named in the errors consumers see.
    local_ranks: ranks on the node (0: unknown); new feeds wait for that many.
    cache: the node cache now (None before the first join), which hears needs and releases.
    session_open: whether the server session is open (closes of a lost session are moot).
    clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, agent_id: str, local_ranks: int, cache: Callable[[], Any],
                 session_open: Callable[[], bool], clock: Callable[[], float] = time.monotonic) -> None:
        self.agent_id = agent_id
        self.local_ranks = int(local_ranks)
        self._cache = cache
        self._session_open = session_open
        self._clock = clock
        self.job = ""  # the job the session serves (the first consumer request naming one)
        self._routes: dict[bytes, dict[int, Route]] = {}  # consumer -> its lane id -> route
        self._lanes: dict[int, _PassThrough] = {}  # pass-through lanes, by server lane
        self._feeds: dict[tuple[int, int], RankFeed] = {}  # (rank, world) -> its feed
        self._feed_lanes: dict[int, list[RankFeed]] = {}  # server lane -> its feeds, in rank order
        self._feed_opens: list[RankFeed] = []  # feeds whose server lane is to open (grouped by next_request)
        self._opens_first = 0.0  # when the oldest new feed of _feed_opens was queued
        self._opens_last = 0.0  # when the latest was
        self._next_lane = 1
        self._pending = pb2.SessionRequest()  # opens and closes for the next session message
        self._acks: dict[int, int] = {}  # server lane -> the step to acknowledge
        self._lane_sent: dict[int, int] = {}  # server lane -> its slowest rank's position last sent
        self.rank_batch = 0  # the job's per-rank batch (from a rank's Join; 0: not known yet)

    # -- what the agent shows ----------------------------------------------------------------------
    @property
    def lane_count(self) -> int:
        """Server lanes open (or opening)."""
        return len(self._lanes) + len(self._feed_lanes)

    @property
    def rank_count(self) -> int:
        """Ranks with a feed."""
        return len(self._feeds)

    @property
    def max_ranks_per_lane(self) -> int:
        """Most ranks one server lane carries: a lane's slice holds every rank's ids of the step,
        and one slice travels whole in one gRPC message, so the ranks' batches together stay
        within `croupier.bounds.MAX_RANK_BATCH` (any number while the batch is not known)."""
        if self.rank_batch <= 0:
            return bounds.INT32_MAX
        return max(1, bounds.MAX_RANK_BATCH // self.rank_batch)

    def has_lanes(self, consumer: bytes) -> bool:
        return bool(self._routes.get(consumer))

    # -- consumers ---------------------------------------------------------------------------------
    def on_request(self, consumer: bytes, req: pb2.SessionRequest) -> pb2.SessionResponse:
        """A consumer's session message (opens, acks, closes, in its own lane ids); returns the
        message it is owed now (buffered slices, confirmations, errors), possibly empty."""
        routes = self._routes.setdefault(consumer, {})
        if req.job:
            if self.job and req.job != self.job:
                message = f"this agent serves job {self.job!r}, not {req.job!r}"
                return pb2.SessionResponse(events=[pb2.LaneEvent(lane=op.lane, error_code="FAILED_PRECONDITION",
                                                                 error=message) for op in req.open])
            self.job = req.job
        out = pb2.SessionResponse()
        for op in req.open:
            old = routes.pop(op.lane, None)
            if old is not None:
                self._close_route(consumer, op.lane, old)
            if op.read_only:
                g = self._new_lane()
                routes[op.lane] = g
                self._lanes[g] = _PassThrough(consumer, op.lane, op.rank)
                opened = self._pending.open.add()
                opened.CopyFrom(op)
                opened.lane = g
            else:
                key = (int(op.rank), int(op.world_size))
                routes[op.lane] = key
                slices = self._join_feed(key, (consumer, op.lane), op)
                if slices:
                    out.lanes.add(lane=op.lane, slices=slices)
        unknown = []
        now = self._clock()
        for ack in req.acks:
            route = routes.get(ack.lane)
            if route is None:
                unknown.append(ack.lane)
            elif isinstance(route, int):
                self._acks[route] = max(self._acks.get(route, -1), ack.next_step)
            elif self._ack_feed(route, (consumer, ack.lane), ack.next_step, now):
                # The feed holds the acknowledgement from now on (and re-sends it on reconnect).
                out.events.add(lane=ack.lane, acked_step=ack.next_step)
            else:
                unknown.append(ack.lane)
        for lane in sorted(set(unknown)):
            # Acknowledgements of lanes this agent never opened: the consumer's previous agent
            # is gone (this one restarted). Tell it at once, so it re-opens instead of waiting.
            out.events.add(lane=lane, error_code="UNAVAILABLE",
                           error=f"lane {lane} is unknown to this agent (agent {self.agent_id} restarted?); "
                                 "open it again")
        for lane in req.close:
            route = routes.pop(lane, None)
            if route is not None:
                self._close_route(consumer, lane, route)
        return out

    def close_consumer(self, consumer: bytes) -> None:
        """A consumer is gone: its lanes close."""
        for local, route in list(self._routes.get(consumer, {}).items()):
            self._close_route(consumer, local, route)
        self._routes.pop(consumer, None)

    def _ack_feed(self, key: tuple[int, int], member: tuple[bytes, int], next_step: int, now: float) -> bool:
        """A worker's acknowledgement, taken by its rank's feed; False when the feed is gone."""
        feed = self._feeds.get(key)
        if feed is None:
            return False
        pos = feed.ack(member, next_step)
        beat = pos is None and feed.sent_position >= 0 and now - feed.sent_at > HEARTBEAT_S
        if beat:
            pos = feed.sent_position  # a rank that only re-confirms stays live on the server
        if pos is not None and feed.lane:
            g = feed.lane
            group = self._feed_lanes.get(g, [feed])
            low = min(max(f.sent_position, 0) for f in group)
            if beat or self._ack_due(g, group, low):
                for f in group:
                    f.sent_at = now
                self._acks[g] = max(self._acks.get(g, -1), pos)
                self._lane_sent[g] = low
            cache = self._cache()
            if cache is not None:
                # A consumer acknowledges a step when it takes it, before it reads its samples;
                # every step of this rank before its position - 1 is read by now (each of its
                # workers is there or later), so those needs end here, without waiting for the
                # server's confirmation.
                cache.release_lane(g, feed.sent_position - 1, feed.rank)
        return True

    def _new_lane(self) -> int:
        g = self._next_lane
        self._next_lane += 1
        return g

    def _join_feed(self, key: tuple[int, int], member: tuple[bytes, int], op: pb2.LaneOpen) -> list[pb2.Slice]:
        """Adds a consumer lane to its rank's feed (opening or re-opening the feed's server lane
        when needed); returns the buffered slices it is owed now."""
        stride = max(int(op.step_stride), 1)
        first = int(op.start_step) + (int(op.step_offset) % stride - int(op.start_step)) % stride
        feed = self._feeds.get(key)
        stop = int(op.stop_step)
        if feed is None:
            feed = RankFeed(rank=key[0], world=key[1], lane=0, start=first, lookahead=int(op.lookahead), stop=stop)
            self._feeds[key] = feed
            self._queue_open(feed)
        elif feed.needs_reopen(first, stop):
            if feed.lane:
                self._dissolve(feed.lane, reopen={id(feed): (first, stop)})
            else:  # its lane has not opened yet: it opens from the earlier step
                feed.reopen(0, first, stop)
        return feed.add(member, op)

    def _queue_open(self, feed: RankFeed) -> None:
        """The feed's server lane opens with the next session message, grouped with the other
        ranks of the node whose lanes open then (one lane of several ranks)."""
        feed.lane = 0
        now = self._clock()
        if not feed.opened:
            if not any(not f.opened for f in self._feed_opens):
                self._opens_first = now
            self._opens_last = now
        self._feed_opens.append(feed)

    def _dissolve(self, g: int, reopen: dict[int, tuple[int, int]] | None = None,
                  drop: RankFeed | None = None) -> None:
        """Closes server lane g; its feeds (but `drop`) open again from what their members are
        still owed (`reopen`: a feed's own (start, stop) instead)."""
        feeds = self._feed_lanes.pop(g, [])
        self._close_server_lane(g)
        for f in feeds:
            if f is drop:
                continue
            start, stop = (reopen or {}).get(id(f), (f.resume_point(), f.stop))
            f.reopen(0, start, stop)
            self._queue_open(f)

    def _close_server_lane(self, g: int) -> None:
        self._acks.pop(g, None)
        self._lane_sent.pop(g, None)
        if self._session_open():
            self._pending.close.append(g)
        cache = self._cache()
        if cache is not None:
            cache.forget_lane(g)

    def _close_route(self, consumer: bytes, local: int, route: Route) -> None:
        if isinstance(route, int):
            if self._lanes.pop(route, None) is not None:
                self._close_server_lane(route)
            return
        feed = self._feeds.get(route)
        if feed is None:
            return
        feed.remove((consumer, local))
        if not feed.members:
            del self._feeds[route]
            if not feed.lane:
                self._feed_opens = [f for f in self._feed_opens if f is not feed]
            elif len(self._feed_lanes.get(feed.lane, ())) > 1:
                self._dissolve(feed.lane, drop=feed)  # the node's other ranks go on in a lane of their own
            else:
                self._feed_lanes.pop(feed.lane, None)
                self._close_server_lane(feed.lane)

    # -- the session -------------------------------------------------------------------------------
    def next_request(self) -> tuple[pb2.SessionRequest, float | None]:
        """The next session message (opens, acknowledgements, closes; possibly empty), and how
        long until waiting lane opens are due (None: none wait)."""
        wait = self._take_opens()
        req = self._pending
        self._pending = pb2.SessionRequest()
        for g, step in self._acks.items():
            req.acks.append(self._lane_ack(g, step))
        self._acks.clear()
        return req, wait

    def _take_opens(self) -> float | None:
        """Moves the queued feeds' lane opens into the pending message, grouping consecutive
        ranks of one world and stop into one lane each; returns how long to wait first instead
        (new feeds wait for the node's other ranks), or None when they were taken."""
        pending = self._feed_opens
        if not pending:
            return None
        now = self._clock()
        if any(not f.opened for f in pending) and now < self._opens_first + OPEN_WAIT_S:
            if self.local_ranks:
                if len(self._feeds) < self.local_ranks:
                    return self._opens_first + OPEN_WAIT_S - now
            elif now < self._opens_last + OPEN_SETTLE_S:
                return self._opens_last + OPEN_SETTLE_S - now
        self._feed_opens = []
        pending.sort(key=lambda f: (f.world, f.stop, f.rank))
        groups: list[list[RankFeed]] = []
        most = self.max_ranks_per_lane
        for f in pending:
            last = groups[-1][-1] if groups else None
            if (last is not None and (last.world, last.stop, last.rank + 1) == (f.world, f.stop, f.rank)
                    and len(groups[-1]) < most):
                groups[-1].append(f)
            else:
                groups.append([f])
        for feeds in groups:
            g = self._new_lane()
            for f in feeds:
                f.lane, f.opened = g, True
            self._feed_lanes[g] = feeds
            head = feeds[0]
            self._pending.open.add(lane=g, rank=head.rank, world_size=head.world,
                                   start_step=min(f.start for f in feeds), lookahead=max(f.lookahead for f in feeds),
                                   step_stride=1, step_offset=0, stop_step=head.stop,
                                   rank_count=len(feeds) if len(feeds) > 1 else 0)
            if any(f.sent_position >= 0 for f in feeds):
                self._acks[g] = max(f.sent_position for f in feeds)
                self._lane_sent[g] = min(max(f.sent_position, 0) for f in feeds)
        return None

    def _ack_due(self, g: int, group: list[RankFeed], low: int) -> bool:
        """Whether lane g's acknowledgement goes to the server now: once its slowest rank moved
        ACK_SHARE-th of the lookahead since the last one sent (the server keeps the rest of the
        window flowing meanwhile), at the lane's stop, and for the first one."""
        last = self._lane_sent.get(g, -1)
        if last < 0:
            return True
        gap = max(1, max(f.lookahead for f in group) // ACK_SHARE)
        stop = group[0].stop
        return low - last >= gap or bool(stop and low >= stop)

    def _lane_ack(self, g: int, step: int) -> pb2.LaneAck:
        """The acknowledgement of server lane g: per rank for a lane of several ranks."""
        feeds = self._feed_lanes.get(g)
        if feeds is None or len(feeds) == 1:
            return pb2.LaneAck(lane=g, next_step=step)
        steps = [max(f.sent_position, 0) for f in feeds]
        return pb2.LaneAck(lane=g, next_step=min(steps), rank_steps=steps)

    def dispatch(self, resp: pb2.SessionResponse) -> Outbox:
        """A message of the server session, split into what each consumer is owed."""
        out: Outbox = {}
        cache = self._cache()
        needs: list[tuple[int, int, int, pb2.Slice]] = []  # (step, rank, lane, slice)
        for ls in resp.lanes:
            feeds = self._feed_lanes.get(ls.lane)
            if feeds is not None:
                for feed, slices in zip(feeds, per_rank(ls.slices, len(feeds))):
                    if cache is not None:
                        needs.extend((int(sl.step), feed.rank, ls.lane, sl) for sl in slices)
                    for (identity, local), got in feed.on_slices(slices).items():
                        out.setdefault(identity, pb2.SessionResponse()).lanes.add(lane=local, slices=got)
                continue
            ln = self._lanes.get(ls.lane)
            if ln is None:
                continue
            m = out.setdefault(ln.consumer, pb2.SessionResponse())
            m.lanes.add(lane=ln.local, slices=ls.slices)
        if needs:
            # The node's needs in the order its ranks will read them: step by step across ranks,
            # not each rank's steps in turn (a message carries several steps of several ranks;
            # the cache ranks shards by when they are first needed).
            needs.sort(key=lambda n: (n[0], n[1]))
            for _step, rank, lane, sl in needs:
                cache.prefetch_slices(lane, (sl,), rank)
        for ev in resp.events:
            feeds = self._feed_lanes.get(ev.lane)
            if feeds is not None:
                if not ev.error_code:
                    if cache is not None and ev.acked_step:
                        for f in feeds:  # each rank got at least the lane's acknowledged step
                            cache.release_lane(ev.lane, min(ev.acked_step, max(f.sent_position, 0)), f.rank)
                    continue
                # The lane failed on the server: every worker of its ranks hears it.
                for feed in feeds:
                    for identity, local in list(feed.members):
                        out.setdefault(identity, pb2.SessionResponse()).events.add(
                            lane=local, error_code=ev.error_code, error=ev.error)
                        self._routes.get(identity, {}).pop(local, None)
                    self._feeds.pop((feed.rank, feed.world), None)
                self._feed_lanes.pop(ev.lane, None)
                if cache is not None:
                    cache.forget_lane(ev.lane)
                continue
            ln = self._lanes.get(ev.lane)
            if ln is None:
                continue
            m = out.setdefault(ln.consumer, pb2.SessionResponse())
            e = m.events.add()
            e.CopyFrom(ev)
            e.lane = ln.local
            if ev.error_code:
                self._routes.get(ln.consumer, {}).pop(ln.local, None)
                self._lanes.pop(ev.lane, None)
        return out

    def lose(self, why: str) -> Outbox:
        """The server session ended: every open lane is reported UNAVAILABLE to its consumer,
        which re-opens it (a new session opens with the first re-opened lane); the table is
        empty afterwards."""
        self._pending = pb2.SessionRequest()
        self._acks.clear()
        self._lane_sent.clear()
        by_consumer: Outbox = {}
        message = f"the agent lost its server session: {why}"
        for ln in self._lanes.values():
            by_consumer.setdefault(ln.consumer, pb2.SessionResponse()).events.add(
                lane=ln.local, error_code="UNAVAILABLE", error=message)
        self._feed_opens = []
        for feed in self._feeds.values():
            for identity, local in feed.members:
                by_consumer.setdefault(identity, pb2.SessionResponse()).events.add(
                    lane=local, error_code="UNAVAILABLE", error=message)
        cache = self._cache()
        if cache is not None:
            for g in [*self._lanes, *self._feed_lanes]:
                cache.forget_lane(g)
        self._lanes.clear()
        self._feeds.clear()
        self._feed_lanes.clear()
        for routes in self._routes.values():
            routes.clear()
        return by_consumer


def per_rank(slices: Iterable[pb2.Slice], n: int) -> list[list[pb2.Slice]]:
    """A lane of n ranks' slices, split into each rank's (its ids are the ranks' one after another)."""
    if n == 1:
        return [list(slices)]
    out: list[list[pb2.Slice]] = [[] for _ in range(n)]
    for sl in slices:
        if sl.kind == pb2.SLICE_KIND_END_OF_DATA:
            for part in out:
                part.append(sl)
            continue
        ids = slice_ids(sl)
        if sl.packed_token_spans:
            for part, piece in zip(out, _token_parts(sl, ids, n)):
                part.append(piece)
            continue
        p = len(ids) // n
        for i, part in enumerate(out):
            part.append(pb2.Slice(step=sl.step, kind=sl.kind, packed_ids=pack_ids(ids[i * p:(i + 1) * p])))
    return out


def _token_parts(sl: pb2.Slice, ids: np.ndarray, n: int) -> list[pb2.Slice]:
    """A step dealt in tokens: n ranks' parts one after another, each exactly 1/n of the slice's
    stream tokens (a document split between two ranks appears in both, with its two spans)."""
    spans = np.frombuffer(sl.packed_token_spans, dtype="<i8").reshape(-1, 3)
    if len(spans) != len(ids):
        raise ValueError(f"slice of step {sl.step} carries {len(spans)} token spans for {len(ids)} ids")
    cum = np.cumsum(spans[:, 1] - spans[:, 0])
    total = int(cum[-1]) if len(cum) else 0
    if total % n:
        raise ValueError(f"slice of step {sl.step} holds {total} tokens, not a multiple of its {n} ranks")
    per = total // n
    ends = np.searchsorted(cum, per * np.arange(1, n + 1), side="left") + 1
    if per and not np.array_equal(cum[ends - 1], per * np.arange(1, n + 1)):
        raise ValueError(f"slice of step {sl.step}: its ranks' parts do not end on {per}-token boundaries")
    out, start = [], 0
    for end in ends.tolist():
        out.append(pb2.Slice(step=sl.step, kind=sl.kind, packed_ids=pack_ids(ids[start:end]),
                             packed_token_spans=np.ascontiguousarray(spans[start:end]).tobytes()))
        start = end
    return out


__all__ = ["ACK_SHARE", "HEARTBEAT_S", "OPEN_SETTLE_S", "OPEN_WAIT_S", "LaneTable", "Outbox", "per_rank"]
