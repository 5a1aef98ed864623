"""One rank's slices on a node agent: one server lane, shared by the rank's DataLoader workers.

A rank read by W DataLoader workers has W consumers (worker w reads the steps t = w mod W).
Opened one by one on the server, that is W lanes, W times the acknowledgements and W polls
per step: server work would grow with workers per rank. The agent instead opens one lane per
rank (every step) and hands each worker its steps; it acknowledges the rank's position on
the workers' behalf: the minimum over the workers' lanes of each lane's next unconsumed step,
as the server computes it from per-worker acknowledgements. Until every worker of the rank
(every offset of the stride) has opened its lane, nothing is acknowledged: the position is
never ahead of what every worker consumed.

A feed keeps the slices from the rank's acknowledged position onward (at most the lookahead
window), so a worker that opens later, or re-opens after a fault, is served from the buffer;
a worker that needs a step before the buffer makes the feed re-open its server lane from that
step (opening never moves a rank's position on the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from croupier.proto import pb2

MemberKey = tuple[bytes, int]  # (consumer identity, the consumer's lane id)


def _lane_first(step: int, offset: int, stride: int) -> int:
    """First step >= `step` that the lane (stride, offset) delivers."""
    return step + (offset - step) % stride


@dataclass
class Member:
    """One consumer lane of the rank (a DataLoader worker, or the rank itself)."""

    stride: int
    offset: int
    next: int  # next step this member is owed
    stop: int  # 0: no stop
    acked: int = 0  # first step of this lane not consumed (as the consumer acknowledged)
    done: bool = False

    def wants(self, step: int) -> bool:
        return (not self.done and step >= self.next and (step - self.offset) % self.stride == 0
                and (self.stop == 0 or step < self.stop))


@dataclass
class RankFeed:
    """The rank `rank` of a world of `world`, fed by server lane `lane` from step `start`."""

    rank: int
    world: int
    lane: int
    start: int
    lookahead: int
    stop: int = 0  # the server lane's stop step (0: none): the latest any member reads
    members: dict[MemberKey, Member] = field(default_factory=dict)
    buffer: dict[int, pb2.Slice] = field(default_factory=dict)
    end: int | None = None
    sent_position: int = -1
    sent_at: float = 0.0
    opened: bool = False  # its server lane was opened at least once (a re-open never waits to group)

    def resume_point(self) -> int:
        """The lowest step a member is still owed (where a re-opened server lane starts)."""
        owed = [m.next for m in self.members.values() if not m.done]
        return min(owed) if owed else max(self.start, self.sent_position)

    # -- members ------------------------------------------------------------------------------------
    def needs_reopen(self, start: int, stop: int) -> bool:
        """Whether a member reading [start, stop) needs steps this feed's server lane does not
        bring: before what it asked for and still holds, or past its stop."""
        low = min(self.buffer, default=None)
        floor = self.start if low is None else min(low, self.start)
        return start < floor or (self.stop != 0 and (stop == 0 or stop > self.stop))

    def reopen(self, lane: int, start: int, stop: int) -> None:
        """The feed's server lane is now `lane`, from the lowest step any member still needs."""
        owed = [m.next for m in self.members.values() if not m.done]
        self.lane = lane
        self.start = min([start, *owed])
        self.stop = 0 if stop == 0 or self.stop == 0 else max(stop, self.stop)

    def add(self, key: MemberKey, op: pb2.LaneOpen) -> list[pb2.Slice]:
        """Adds a member; returns the buffered slices it is owed now (in step order)."""
        stride = max(int(op.step_stride), 1)
        offset = int(op.step_offset) % stride
        first = _lane_first(int(op.start_step), offset, stride)
        m = Member(stride, offset, first, int(op.stop_step), acked=first)
        self.members[key] = m
        self.lookahead = max(self.lookahead, int(op.lookahead))
        return self._deliverable(m)

    def remove(self, key: MemberKey) -> None:
        self.members.pop(key, None)

    def _deliverable(self, m: Member) -> list[pb2.Slice]:
        out = []
        while True:
            if self.end is not None and m.next >= self.end:
                if not m.done and (m.stop == 0 or m.next < m.stop):
                    out.append(pb2.Slice(step=m.next, kind=pb2.SLICE_KIND_END_OF_DATA))
                    m.done = True
                return out
            sl = self.buffer.get(m.next)
            if sl is None or not m.wants(m.next):
                return out
            out.append(sl)
            m.next += m.stride

    # -- from the server ----------------------------------------------------------------------------
    def on_slices(self, slices) -> dict[MemberKey, list[pb2.Slice]]:
        """Slices of the feed's server lane (consecutive steps): kept, and handed out to members."""
        for sl in slices:
            if sl.kind == pb2.SLICE_KIND_END_OF_DATA:
                self.end = sl.step if self.end is None else min(self.end, sl.step)
            elif sl.step >= max(self.sent_position, 0):
                self.buffer[sl.step] = sl
        out: dict[MemberKey, list[pb2.Slice]] = {}
        for key, m in self.members.items():
            got = self._deliverable(m)
            if got:
                out[key] = got
        return out

    # -- acknowledgements ---------------------------------------------------------------------------
    def ack(self, key: MemberKey, next_step: int) -> int | None:
        """A member consumed its steps before `next_step`. Returns the rank's new position to
        acknowledge on the server lane when it moved, else None; drops slices below it."""
        m = self.members.get(key)
        if m is None:
            return None
        m.acked = max(m.acked, int(next_step))
        pos = self.position()
        if pos is None or pos <= self.sent_position:
            return None
        self.sent_position = pos
        for step in [s for s in self.buffer if s < pos]:
            del self.buffer[step]
        return pos

    def position(self) -> int | None:
        """The rank's consumed position: over every group of members of one stride, the
        minimum of each lane's next unconsumed step; None until a group has every offset."""
        groups: dict[int, dict[int, int]] = {}
        for m in self.members.values():
            nxt = _lane_first(m.acked, m.offset, m.stride)
            lanes = groups.setdefault(m.stride, {})
            lanes[m.offset] = min(lanes.get(m.offset, nxt), nxt)
        if not groups or any(len(lanes) < stride for stride, lanes in groups.items()):
            return None
        return min(min(lanes.values()) for lanes in groups.values())
