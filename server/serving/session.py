"""The Session RPC: one bidirectional stream carrying many lanes' slices and acknowledgements.

A lane is one consumer of slices: a rank, or one DataLoader worker of a rank (stride N,
offset w). A rank's own client opens one session with its lanes; a node agent opens one
session for every rank and worker of its node. Either way the server holds one stream (a
coroutine, no thread) per session instead of one per consumer, and acknowledgements arrive
in-band instead of as unary calls: per message, not per call.

Each lane is a `SliceStream` of the job, so flow control, lag bound, read-only readers and
end of data behave exactly as on StreamSlices. A lane the job refuses (bad rank, step out
of range, job re-formed) is closed with a `LaneEvent` naming the status code and reason; the
session and its other lanes go on. Only a malformed message or another job's name ends the
whole session.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from croupier.errors import ConfigError, CroupierError
from croupier.proto import pb2
from croupier.server.job.job import MAX_IDS_PER_MESSAGE, MAX_SLICES_PER_MESSAGE, Job, SliceStream

log = logging.getLogger(__name__)

FULL_POLL_S = 5.0
"""Every lane of a session is polled at least this often, woken or not (liveness changes with time)."""
EVENT_HOLD_S = 0.05
"""Acknowledgement confirmations alone wait up to this long for slices to ride along with: one
message instead of two per acknowledgement, on a stream whose slices follow the acks within a
step. Refusals are never held, and a client re-sends an unconfirmed ack only after a second."""
MAX_LANES_PER_SESSION = 4096
"""Most lanes one session may hold open (a node of 8 ranks x 64 workers stays far below)."""


@dataclass
class Lane:
    """One open lane of a session."""

    lane: int
    rank: int
    world: int
    stride: int
    offset: int
    stream: SliceStream
    count: int = 1  # ranks rank .. rank + count - 1
    finished: bool = False  # delivered everything; kept open for acknowledgements until closed


@dataclass
class SessionState:
    """What the server knows of one open session (status shows it)."""

    peer: str
    opened: float = field(default_factory=time.monotonic)
    job: str = ""
    lanes: dict[int, Lane] = field(default_factory=dict)
    node: pb2.NodeReport | None = None
    events: list[pb2.LaneEvent] = field(default_factory=list)
    rotate: int = 0

    def status(self) -> pb2.SessionStatus:
        st = pb2.SessionStatus(peer=self.peer, ranks=sorted({r for ln in self.lanes.values()
                                                             for r in range(ln.rank, ln.rank + ln.count)}),
                               lanes=len(self.lanes), seconds_open=time.monotonic() - self.opened)
        if self.node is not None:
            st.node.CopyFrom(self.node)
        return st


class SessionHandler:
    """Runs one Session call against a job.

    `run(requests)` is an async generator of responses: a reader task applies the client's
    messages (open, ack, close, node report) as they arrive and wakes the writer, which sends
    whatever every lane may receive now, in one message, and otherwise waits to be woken (by
    the reader, or by the job when flow control moves).
    """

    def __init__(self, job: Job, state: SessionState, wake: Callable[[], None],
                 slice_pb: Callable[[object], pb2.Slice], code_of: Callable[[CroupierError], object]) -> None:
        self.job = job
        self.state = state
        self.wake = wake
        self._slice_pb = slice_pb
        self._code_of = code_of
        self.client_done = False
        self._dirty: set[int] = set()  # lanes woken since their last poll
        self._full_poll = time.monotonic()
        self._held_since: float | None = None  # confirmations waiting for slices to ride with

    # -- reading ---------------------------------------------------------------------------------
    async def read(self, requests: AsyncIterator[pb2.SessionRequest]) -> None:
        """Applies the client's messages until it half-closes."""
        try:
            async for request in requests:
                self.apply(request)
                self.wake()
        finally:
            self.client_done = True
            self.wake()

    def apply(self, request: pb2.SessionRequest) -> None:
        st = self.state
        if request.job:
            if st.job and request.job != st.job:
                raise ConfigError(f"a session serves one job: it opened for job {st.job!r}, "
                                  f"a message names {request.job!r}")
            self.job.check_job(request.job)
            st.job = request.job
        if request.HasField("node"):
            st.node = request.node
        for op in request.open:
            self._open(op)
        if request.acks:
            self._ack_all(request.acks)
        for lane in request.close:
            self._close(lane)

    def _open(self, op: pb2.LaneOpen) -> None:
        st = self.state
        if op.lane in st.lanes:
            self._fail(op.lane, ConfigError(f"lane {op.lane} is already open on this session"), close=False)
            return
        if len(st.lanes) >= MAX_LANES_PER_SESSION:
            self._fail(op.lane, ConfigError(f"a session holds at most {MAX_LANES_PER_SESSION} lanes; "
                                            f"lane {op.lane} would be one more"), close=False)
            return
        try:
            stream = self.job.open_stream(
                rank=op.rank, world=op.world_size, start_step=op.start_step, lookahead=op.lookahead,
                step_stride=op.step_stride, step_offset=op.step_offset, stop_step=op.stop_step,
                job=st.job, read_only=op.read_only, rank_count=op.rank_count)
        except CroupierError as exc:
            self._fail(op.lane, exc, close=False)
            return
        lane = op.lane
        stream.waiter.on_wake = lambda: self._woken(lane)
        stride = max(int(op.step_stride), 1)
        st.lanes[op.lane] = Lane(op.lane, op.rank, op.world_size, stride, op.step_offset, stream,
                                 count=max(int(op.rank_count), 1))
        self._dirty.add(op.lane)

    def _woken(self, lane: int) -> None:
        """A lane's waiter was woken (flow control moved for it): poll it, and only it."""
        self._dirty.add(lane)  # set.add is atomic: the job may wake a lane from another thread
        self.wake()

    def _ack_all(self, acks) -> None:
        """Applies a message's acknowledgements together (one job call for all its lanes). A lane
        of several ranks is acknowledged per rank (`LaneAck.rank_steps`), or every rank at
        next_step when rank_steps is empty."""
        lanes = self.state.lanes
        entries: list[tuple[int, int, int, int, int]] = []
        spans: list[tuple[int, int, int, int]] = []  # (lane, step, first entry, entries)
        for a in acks:
            ln = lanes.get(a.lane)
            if ln is None:
                continue  # a lane closed meanwhile: an acknowledgement is idempotent and may be dropped
            steps = list(a.rank_steps)
            if steps and len(steps) != ln.count:
                self._fail(a.lane, ConfigError(f"an acknowledgement of a lane of {ln.count} ranks carries one step "
                                               f"per rank: lane {a.lane} got {len(steps)} rank steps"))
                continue
            if not steps:
                steps = [a.next_step] * ln.count
            spans.append((a.lane, a.next_step, len(entries), ln.count))
            entries.extend((ln.rank + i, ln.world, step, ln.stride, ln.offset) for i, step in enumerate(steps))
        if not entries:
            return
        errors = self.job.ack_lanes(self.state.job, entries)
        events = self.state.events
        for lane, step, first, n in spans:
            exc = next((e for e in errors[first:first + n] if e is not None), None)
            if exc is None:
                events.append(pb2.LaneEvent(lane=lane, acked_step=step))
            else:
                self._fail(lane, exc)

    def _close(self, lane: int) -> None:
        ln = self.state.lanes.pop(lane, None)
        if ln is not None:
            ln.stream.waiter.on_wake = None
            ln.stream.close()

    def _fail(self, lane: int, exc: CroupierError, close: bool = True) -> None:
        code = self._code_of(exc)
        name = getattr(code, "name", str(code))
        log.info("lane refused", extra={"event": "lane_refused", "lane": lane, "code": name, "reason": str(exc),
                                        "peer": self.state.peer})
        self.state.events.append(pb2.LaneEvent(lane=lane, error_code=name, error=str(exc)))
        if close:
            self._close(lane)

    # -- writing ---------------------------------------------------------------------------------
    def wait_s(self, longest: float) -> float:
        """How long the writer may sleep before `collect` has something due (held confirmations)."""
        if self._held_since is None:
            return longest
        return max(0.0, min(longest, self._held_since + EVENT_HOLD_S - time.monotonic()))

    def collect(self, flush: bool = False) -> pb2.SessionResponse | None:
        """Everything deliverable now (slices of the lanes woken since their last poll, and of
        every lane at least every FULL_POLL_S; events), or None when nothing is. Confirmations
        of acknowledgements with no slice to ride along are held up to EVENT_HOLD_S (`flush`
        sends them at once)."""
        st = self.state
        now = time.monotonic()
        if not self._dirty and not st.events and now - self._full_poll < FULL_POLL_S:
            return None  # the common case after a send: nothing woken, nothing to confirm
        resp = pb2.SessionResponse()
        if now - self._full_poll >= FULL_POLL_S:
            self._full_poll = now
            lanes = list(st.lanes.values())
            self._dirty.clear()
        else:
            dirty, self._dirty = self._dirty, set()
            lanes = [st.lanes[k] for k in dirty if k in st.lanes]
        if lanes:
            k = st.rotate % len(lanes)
            lanes = lanes[k:] + lanes[:k]  # no lane starves another when a message fills up
            st.rotate += 1
        n_ids = 0
        lanes = [ln for ln in lanes if not ln.finished]
        # polled in rounds under one job lock each, until the message holds MAX_IDS_PER_MESSAGE
        # ids; lanes not reached are polled in the next message
        per_lane = (max(self.job.global_batch // max(lanes[0].world, 1), 1) * max(ln.count for ln in lanes)
                    if lanes else 1)
        while lanes:
            if n_ids >= MAX_IDS_PER_MESSAGE:
                self._dirty.update(ln.lane for ln in lanes)  # their turn comes in the next message
                break
            take = max(1, (MAX_IDS_PER_MESSAGE - n_ids) // (per_lane * MAX_SLICES_PER_MESSAGE))
            batch, lanes = lanes[:take], lanes[take:]
            for ln, chunk in zip(batch, self.job.poll_streams([ln.stream for ln in batch])):
                if isinstance(chunk, CroupierError):
                    self._fail(ln.lane, chunk)
                    continue
                if chunk is None:
                    ln.finished = True
                    continue
                if chunk:
                    resp.lanes.add(lane=ln.lane, slices=[self._slice_pb(s) for s in chunk])
                    got = sum(len(s.ids) for s in chunk)
                    n_ids += got
                    if len(chunk) >= MAX_SLICES_PER_MESSAGE or got >= MAX_IDS_PER_MESSAGE:
                        self._dirty.add(ln.lane)  # a full chunk may leave more deliverable: look again
        if st.events and not resp.lanes and not flush and all(not ev.error_code for ev in st.events):
            if self._held_since is None:
                self._held_since = now
            if now - self._held_since < EVENT_HOLD_S:
                return None
        if st.events:
            resp.events.extend(st.events)
            st.events.clear()
        self._held_since = None
        if not resp.lanes and not resp.events:
            return None
        return resp

    def streaming(self) -> bool:
        """Whether any lane may still deliver slices."""
        return any(not ln.finished for ln in self.state.lanes.values())

    def close(self) -> None:
        for lane in list(self.state.lanes):
            self._close(lane)
