"""Flow control of one job: who waits for which step, the bounds that release them, open streams.

A rank may receive step t on its training stream only when t < its position + lookahead and
t < the slowest live rank's position + max lag; a read-only stream, and a GetSlice, are
bounded by the lag bound alone. A caller that cannot have its step yet waits on a `Waiter`,
woken when an acknowledgement moves its own rank (lookahead) or the slowest rank (lag), or
when the job re-forms (every open stream of an older formation then ends with JobReformed).

`Flow` holds no lock: the job calls it under its one lock. A `SliceStream` goes back to its
job (`StreamOwner`) for every poll and for closing, so that happens under that lock too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

from croupier.errors import ConfigError
from croupier.server.job.ranks import RankProgress, RankTable
from croupier.server.job.types import JobReformed, SliceData, StepOutOfRange

log = logging.getLogger(__name__)

__all__ = ["MAX_IDS_PER_MESSAGE", "MAX_SLICES_PER_MESSAGE", "Flow", "SliceStream", "StreamOwner", "Waiter",
           "stream_shape"]

MAX_SLICES_PER_MESSAGE = 32
"""Most steps packed into one stream message."""
MAX_IDS_PER_MESSAGE = 1 << 20
"""Most sample ids in one stream message (8 MiB of packed int64, under the 16 MiB limit)."""


class Waiter:
    """A blocked stream or GetSlice. `lagged`: held by the lag bound (woken when the slowest
    rank moves) rather than by its own lookahead (woken only by its own rank's acks).
    `on_wake`, when set, is called (from any thread) on every wake-up: the asyncio servicer
    hands it a thread-safe callback into its event loop."""

    __slots__ = ("event", "cancelled", "lagged", "on_wake")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.cancelled = False
        self.lagged = True
        self.on_wake: Callable[[], None] | None = None

    def wake(self) -> None:
        self.event.set()
        cb = self.on_wake
        if cb is not None:
            cb()


class StreamOwner(Protocol):
    """What a `SliceStream` asks of its job; each call takes the job's lock."""

    def poll_stream(self, stream: SliceStream) -> list[SliceData] | None: ...

    def close_stream(self, stream: SliceStream) -> None: ...


def stream_shape(rank: int, world: int, lookahead: int, step_stride: int, step_offset: int, stop_step: int,
                 rank_count: int, max_lookahead: int) -> tuple[int, int, int]:
    """Validates a stream's request; returns (stride, rank count, lookahead in force)."""
    stride = max(int(step_stride), 1)
    if step_stride < 0:
        raise ConfigError(f"step stride must be >= 0, got {step_stride}")
    if not 0 <= step_offset < stride:
        raise ConfigError(f"step offset {step_offset} is outside [0, step stride {stride})")
    if lookahead < 0:
        raise ConfigError(f"lookahead must be >= 0, got {lookahead}")
    if stop_step < 0:
        raise ConfigError(f"stop step must be >= 0 (0 = no stop), got {stop_step}")
    if rank_count < 0:
        raise ConfigError(f"rank count must be >= 0 (0 or 1: one rank), got {rank_count}")
    count = max(int(rank_count), 1)
    if count > 1 and rank + count > world:
        raise ConfigError(f"a lane's ranks must lie in the world: ranks {rank}..{rank + count - 1} "
                          f"(rank {rank}, rank count {count}) exceed world size {world}")
    la = max_lookahead if lookahead == 0 else min(int(lookahead), max_lookahead)
    return stride, count, la


class SliceStream:
    """One open stream of a rank's slices (StreamSlices); made by `Job.open_stream`.

    `poll()` returns the consecutive slices deliverable now under flow control (possibly
    none), or None when the stream is finished; `next_chunk()` blocks until `poll` has
    something. `cancel()` (any thread) releases a waiting `next_chunk()`; `close()` once.
    A read-only stream touches no rank state and waits on no rank (`Flow._collect_read_only`).
    rank_count > 1: the stream carries ranks rank .. rank + count - 1 (a node agent's ranks).
    """

    def __init__(self, owner: StreamOwner, rank: int, world: int, first: int, lookahead: int, stride: int,
                 stop_step: int, waiter: Waiter, epoch: int, read_only: bool = False, count: int = 1) -> None:
        self._owner = owner
        self.rank = rank
        self.count = count
        self.ranks = range(rank, rank + count)
        self.world = world
        self.next = first
        self.lookahead = lookahead
        self.stride = stride
        self.stop = stop_step
        self.read_only = read_only
        self.waiter = waiter
        self.epoch = epoch
        self.finished = False
        self._closed = False

    def cancel(self) -> None:
        self.waiter.cancelled = True
        self.waiter.wake()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._owner.close_stream(self)
        log.info("stream closed", extra={"event": "stream_close", "rank": self.rank, "next": self.next})

    def __iter__(self) -> Iterator[list[SliceData]]:
        while True:
            chunk = self.next_chunk()
            if chunk is None:
                return
            yield chunk

    def poll(self) -> list[SliceData] | None:
        """Slices deliverable now ([] when none), or None when the stream is finished."""
        return self._owner.poll_stream(self)

    def next_chunk(self, poll: float = 10.0) -> list[SliceData] | None:
        while True:
            chunk = self.poll()
            if chunk is None or chunk:
                return chunk
            self.waiter.event.wait(poll)


class Flow:
    """The waiters and bounds of one job (see the module docstring); no lock of its own.

    slice_of(step, rank, world, count): the slices of ranks rank .. rank + count - 1 of a step.
    is_end(step): whether the step is at or past the end of data.
    """

    def __init__(self, table: RankTable, max_lag: int, max_lookahead: int,
                 slice_of: Callable[[int, int, int, int], SliceData], is_end: Callable[[int], bool],
                 read_slice_of: Callable[[int, int, int, int, SliceStream], SliceData | None]) -> None:
        self.table = table
        self._read_slice_of = read_slice_of
        self.max_lag = max_lag
        self.max_lookahead = max_lookahead
        self.epoch = 0  # bumps on every re-form; open streams of an older epoch end
        self._slice_of = slice_of
        self._is_end = is_end
        self._waiters: dict[int, set[Waiter]] = {}

    # -- waiters ----------------------------------------------------------------------------------
    def wait_on(self, ranks: Iterable[int]) -> Waiter:
        """A new waiter, woken by what moves any of `ranks`."""
        waiter = Waiter()
        for r in ranks:
            self._waiters.setdefault(r, set()).add(waiter)
        return waiter

    def discard(self, ranks: Iterable[int], waiter: Waiter) -> None:
        for r in ranks:
            self._waiters.get(r, set()).discard(waiter)

    def notify(self, rank: int) -> None:
        for w in self._waiters.get(rank, ()):
            w.wake()

    def notify_all(self) -> None:
        for ws in self._waiters.values():
            for w in ws:
                w.wake()

    def notify_lagged(self) -> None:
        for ws in self._waiters.values():
            for w in ws:
                if w.lagged:
                    w.wake()

    def reformed(self) -> None:
        """The job re-formed: open streams end, every waiter wakes to see it."""
        self.epoch += 1
        self.notify_all()

    # -- bounds -----------------------------------------------------------------------------------
    def far_bound(self, generated: int) -> int:
        """The furthest step any call may name: the further of the slowest rank's step and the
        generated step (`generated`), + max lag + lookahead."""
        return max(self.table.slowest, generated) + self.max_lag + self.max_lookahead

    def far_reason(self, generated: int) -> str:
        return (f"the bound is step {self.far_bound(generated)}: the furthest of slowest rank step "
                f"{self.table.slowest} and generated step {generated}, + max lag {self.max_lag} "
                f"+ lookahead {self.max_lookahead}")

    def check_step(self, step: int, what: str, generated: int) -> None:
        if step < 0:
            raise StepOutOfRange(f"{what} {step} is negative")
        if step > self.far_bound(generated) and not self._is_end(step):
            raise StepOutOfRange(f"{what} {step} is too far ahead ({self.far_reason(generated)})")

    def check_ack(self, next_step: int, step_stride: int, step_offset: int, far: int, generated: int) -> int:
        """An acknowledgement's lane and step checked (ConfigError, StepOutOfRange); its stride."""
        stride = max(int(step_stride), 1)
        if not 0 <= step_offset < stride:
            raise ConfigError(f"step offset {step_offset} is outside [0, step stride {stride})")
        if next_step < 0:
            raise StepOutOfRange(f"acknowledged step {next_step} is negative")
        if next_step > far:
            raise StepOutOfRange(f"acknowledged step {next_step} is ahead of anything the rank could "
                                 f"have received ({self.far_reason(generated)})")
        return stride

    def releases(self, step: int) -> bool:
        """Whether a GetSlice of `step` may be answered now (the lag bound alone)."""
        return step < self.table.slowest + self.max_lag or self._is_end(step)

    # -- streams ----------------------------------------------------------------------------------
    def closed(self, stream: SliceStream) -> None:
        """A stream closed: its waiter goes, its ranks count one stream less (same formation)."""
        for r in stream.ranks:
            self._waiters.get(r, set()).discard(stream.waiter)
            prog = self.table.ranks.get(r)
            if prog is not None and stream.epoch == self.epoch and not stream.read_only:
                prog.streams = max(prog.streams - 1, 0)

    def poll(self, stream: SliceStream) -> list[SliceData] | None:
        """The stream's slices deliverable now ([] when none), None when it is finished."""
        if stream.waiter.cancelled or stream.finished:
            return None
        stream.waiter.event.clear()
        if stream.epoch != self.epoch:
            raise JobReformed(f"the job was re-formed at step {self.table.formed_at} with world size "
                              f"{self.table.world}; join again")
        chunk = self._collect(stream)
        if not chunk and stream.finished:
            return None
        return chunk

    def _collect_read_only(self, st: SliceStream) -> list[SliceData]:
        """A read-only stream's next slices: no rank's position bounds it, and it waits on
        nothing but a step the job must generate first (`read_slice_of` returns None)."""
        st.waiter.lagged = False
        out = self._take(st, st.next + max(st.lookahead, 1) * st.stride,
                         lambda step: self._read_slice_of(step, st.rank, st.world, st.count, st), (), past_end=False)
        if out and st.stop and not st.finished and not st.waiter.lagged:
            st.waiter.wake()  # a bounded reader (a dump, a replay): more now, paced by the transport
        # an unbounded read-only stream gets a lookahead of steps per poll, as a rank's would
        return out

    def _collect(self, st: SliceStream) -> list[SliceData]:
        if st.read_only:
            return self._collect_read_only(st)
        table = self.table
        lag_bound = table.slowest + self.max_lag
        progs: list[RankProgress] = []
        for r in st.ranks:
            prog = table.ranks.get(r)
            if prog is None:
                raise JobReformed(f"rank {r} is no longer part of the job; join again")
            progs.append(prog)
        own_bound = min(p.next_step for p in progs) + st.lookahead
        st.waiter.lagged = lag_bound <= own_bound
        return self._take(st, min(own_bound, lag_bound), lambda step: self._slice_of(step, st.rank, st.world, st.count),
                          progs, past_end=True)

    def _take(self, st: SliceStream, bound: int, fetch: Callable[[int], SliceData | None],
              progs: Sequence[RankProgress], past_end: bool) -> list[SliceData]:
        """The stream's slices from its next step below `bound` (and its stop; `past_end`: the
        end-of-data marker too), within one message's limits; a None from `fetch` means wait."""
        out: list[SliceData] = []
        n_ids = 0
        while st.next < bound or (past_end and self._is_end(st.next)):
            if st.stop and st.next >= st.stop:
                break
            sl = fetch(st.next)
            if sl is None:
                st.waiter.lagged = True  # woken as the ranks (and so the generator) move
                break
            out.append(sl)
            n_ids += len(sl.ids)
            for prog in progs:
                prog.delivered_step = max(prog.delivered_step, st.next + 1)
            st.next += st.stride
            if sl.end:
                st.finished = True
                break
            if len(out) >= MAX_SLICES_PER_MESSAGE or n_ids >= MAX_IDS_PER_MESSAGE:
                break
        if st.stop and st.next >= st.stop:
            st.finished = True
        return out
