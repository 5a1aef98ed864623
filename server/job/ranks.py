"""The rank table of a job: who has joined, where each rank is, who holds the others back.

A rank's **position** is the first step it has not consumed. Only acknowledgements move it,
and only forward: an acknowledgement is idempotent (re-sending it, or an older one, changes
nothing), and opening a stream, a read-only reader or a re-request never moves it. A rank
read by N DataLoader workers (worker w reads the steps t with t % N == w) acknowledges per
*lane* (stride N, offset w); its position is the minimum over its lanes of each lane's next
unconsumed step, so one fast worker never speaks for a slow one.

The **slowest** step (which bounds how far any rank may run ahead) is the minimum position
over the live ranks of the world; ranks of the world that have not joined count at the step
the job formed at (for at most `timeout_s` after the formation or server start). A rank silent (no call, no acknowledgement) for longer than `timeout_s`
is not live: it stops holding the others back, is reported as such, and is re-admitted at
its position as soon as it calls again.

The table has no lock of its own: the job calls it under its lock.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from croupier.errors import ConfigError


@dataclass
class RankProgress:
    """What the server knows of one rank."""

    next_step: int
    delivered_step: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    streams: int = 0
    stride: int = 1
    lanes: dict[int, int] = field(default_factory=dict)  # offset -> acknowledged next step of the lane
    base: int = 0  # the position when the current stride's lanes started

    def acknowledge(self, next_step: int, stride: int = 1, offset: int = 0) -> bool:
        """Records that the stream (stride, offset) consumed every one of its steps before
        `next_step`; returns whether the rank's position moved."""
        old = self.next_step
        stride = max(int(stride), 1)
        if stride == 1:
            self.stride, self.lanes = 1, {}
            self.next_step = max(self.next_step, next_step)
            return self.next_step != old
        if stride != self.stride:
            self.stride, self.lanes, self.base = stride, {}, self.next_step
        self.lanes[offset] = max(self.lanes.get(offset, self.base), next_step)
        pos = min(_lane_next(self.lanes.get(w, self.base), w, stride) for w in range(stride))
        self.next_step = max(self.next_step, pos)
        return self.next_step != old


def _lane_next(position: int, offset: int, stride: int) -> int:
    """First step >= position that the lane (stride, offset) delivers."""
    return position + (offset - position) % stride


@dataclass(frozen=True)
class RankView:
    rank: int
    next_step: int
    delivered_step: int
    seconds_since_seen: float
    connected: bool
    live: bool


class RankTable:
    """Positions, liveness and the slowest step of one job's ranks (see the module docstring)."""

    def __init__(self, timeout_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"rank liveness timeout must be > 0 seconds, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self._clock = clock
        self.ranks: dict[int, RankProgress] = {}
        self.world: int | None = None
        self.formed_at = 0
        self.slowest = 0
        self.silent: frozenset[int] = frozenset()
        self._formed_time = clock()
        self._counts: Counter[int] = Counter()  # positions of the live members (and the not-yet-joined)
        self.top = 0  # the fastest position, kept incrementally

    def reset(self, world: int | None, formed_at: int) -> None:
        """A new formation: every rank starts over at `formed_at`."""
        self.world, self.formed_at, self.ranks = world, formed_at, {}
        self._formed_time = self._clock()
        self.recompute()

    def get(self, rank: int) -> RankProgress:
        """The rank's progress, registering it at the formation step when new."""
        prog = self.ranks.get(rank)
        if prog is None:
            prog = self.ranks[rank] = RankProgress(next_step=self.formed_at, delivered_step=self.formed_at,
                                                   last_seen=self._clock(), base=self.formed_at)
        return prog

    def restore(self, positions: dict[int, int]) -> None:
        now = self._clock()
        for r, nxt in positions.items():
            self.ranks[int(r)] = RankProgress(next_step=int(nxt), delivered_step=int(nxt), last_seen=now,
                                              base=int(nxt))

    def join(self, rank: int, world: int, at: int | None = None) -> RankProgress:
        """Registers a rank of a `world`-rank job, heard from now. `at`: the step of the resume
        token it carries (the job is already formed there): the rank starts over at it."""
        if at is not None:
            prog = self.get(rank)
            prog.next_step = prog.delivered_step = prog.base = at
            prog.lanes = {}
        else:
            if self.world is None:
                self.world = world
            elif world != self.world:
                raise ConfigError(f"world size {world} does not match the job's world size {self.world}; "
                                  "pass a checkpoint token to re-form the job with another world size")
            prog = self.get(rank)
        self.seen(rank)
        return prog

    def acknowledge(self, rank: int, next_step: int, stride: int, offset: int) -> tuple[bool, bool, bool]:
        """A rank's lane (stride, offset) consumed its steps before `next_step`; the rank is
        heard from now. Returns (re-admitted, position moved, slowest step moved); a
        re-admitted rank needs a `recompute` (the slowest step is then not kept incrementally)."""
        readmitted = self.seen(rank)
        prog = self.get(rank)
        old = prog.next_step
        moved = prog.acknowledge(next_step, stride, offset)
        slowest_moved = not readmitted and moved and self.moved(rank, old, prog.next_step)
        return readmitted, moved, slowest_moved

    def seen(self, rank: int) -> bool:
        """Marks the rank as heard from now; returns whether that re-admitted it."""
        prog = self.get(rank)
        prog.last_seen = self._clock()
        return rank in self.silent

    def recompute(self) -> bool:
        """Re-derives liveness and the slowest step; returns whether the slowest step changed."""
        world = self.world or 0
        now = self._clock()
        members = {r: p for r, p in self.ranks.items() if r < world}
        silent = frozenset(r for r, p in members.items() if now - p.last_seen > self.timeout_s)
        live = [p.next_step for r, p in members.items() if r not in silent]
        if len(members) < world and now - self._formed_time <= self.timeout_s:
            live.append(self.formed_at)  # ranks that have not joined yet, until the timeout
        if not live:  # everyone is silent: nobody holds anyone back
            live = [max((p.next_step for p in members.values()), default=self.formed_at)]
        old = self.slowest
        self.silent = silent
        self._counts = Counter(live)
        self.slowest = min(live)
        self.top = self.fastest()
        return self.slowest != old

    def moved(self, rank: int, old: int, new: int) -> bool:
        """A member's position moved from `old` to `new` (an acknowledgement); updates the slowest
        step incrementally, in O(distinct positions). Returns whether the slowest step changed."""
        self.top = max(self.top, new)
        if rank >= (self.world or 0) or rank in self.silent or self._counts[old] <= 0:
            return False
        self._counts[old] -= 1
        self._counts[new] += 1
        if self._counts[old] == 0:
            del self._counts[old]
            if old == self.slowest:
                self.slowest = min(self._counts)
                return True
        return False

    def fastest(self) -> int:
        return max((p.next_step for p in self.ranks.values()), default=self.formed_at)

    def positions(self) -> dict[int, int]:
        return {r: p.next_step for r, p in self.ranks.items()}

    def views(self) -> tuple[RankView, ...]:
        now = self._clock()
        return tuple(RankView(r, p.next_step, p.delivered_step, max(now - p.last_seen, 0.0), p.streams > 0,
                              r not in self.silent)
                     for r, p in sorted(self.ranks.items()))

    def next_deadline(self) -> float:
        """Seconds until some live rank would turn silent (inf when none can)."""
        now = self._clock()
        left = [p.last_seen + self.timeout_s - now for r, p in self.ranks.items() if r not in self.silent]
        return max(min(left), 0.0) if left else math.inf
