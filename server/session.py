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

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from croupier.errors import ConfigError, CroupierError
from croupier.proto import pb2
from croupier.server.job import MAX_IDS_PER_MESSAGE, MAX_SLICES_PER_MESSAGE, Job, SliceStream

log = logging.getLogger("croupier.server.session")

FULL_POLL_S = 5.0
"""Every lane of a session is polled at least this often, woken or not (liveness changes with time)."""
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
        st = pb2.SessionStatus(peer=self.peer, ranks=sorted({ln.rank for ln in self.lanes.values()}),
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
        for ack in request.acks:
            self._ack(ack)
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
                job=st.job, read_only=op.read_only)
        except CroupierError as exc:
            self._fail(op.lane, exc, close=False)
            return
        lane = op.lane
        stream.waiter.on_wake = lambda: self._woken(lane)
        stride = max(int(op.step_stride), 1)
        st.lanes[op.lane] = Lane(op.lane, op.rank, op.world_size, stride, op.step_offset, stream)
        self._dirty.add(op.lane)

    def _woken(self, lane: int) -> None:
        """A lane's waiter was woken (flow control moved for it): poll it, and only it."""
        self._dirty.add(lane)  # set.add is atomic: the job may wake a lane from another thread
        self.wake()

    def _ack(self, ack: pb2.LaneAck) -> None:
        ln = self.state.lanes.get(ack.lane)
        if ln is None:
            return  # a lane closed meanwhile; an acknowledgement is idempotent and may be dropped
        try:
            self.job.ack(rank=ln.rank, world=ln.world, next_step=ack.next_step, job=self.state.job,
                         step_stride=ln.stride, step_offset=ln.offset)
        except CroupierError as exc:
            self._fail(ack.lane, exc)
            return
        self.state.events.append(pb2.LaneEvent(lane=ack.lane, acked_step=ack.next_step))

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
    def collect(self) -> pb2.SessionResponse | None:
        """Everything deliverable now (slices of the lanes woken since their last poll, and of
        every lane at least every FULL_POLL_S; events), or None when nothing is."""
        st = self.state
        resp = pb2.SessionResponse()
        now = time.monotonic()
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
        for ln in lanes:
            if n_ids >= MAX_IDS_PER_MESSAGE:
                self._dirty.add(ln.lane)  # its turn comes in the next message
                continue
            if ln.finished:
                continue
            try:
                chunk = ln.stream.poll()
            except CroupierError as exc:
                self._fail(ln.lane, exc)
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
        if st.events:
            resp.events.extend(st.events)
            st.events.clear()
        if not resp.lanes and not resp.events:
            return None
        return resp

    def streaming(self) -> bool:
        """Whether any lane may still deliver slices."""
        return any(not ln.finished for ln in self.state.lanes.values())

    def close(self) -> None:
        for lane in list(self.state.lanes):
            self._close(lane)
