"""A consumer's way to the sampler through its node's agent (ZeroMQ IPC; see agent_protocol).

One `AgentTransport` per process (made after any fork, as `RankClient` does): a DEALER
socket owned by one I/O thread; other threads hand it frames through a queue and wake it
through a pipe. Replies are matched to calls by request id; session messages are routed to
the lanes they name.

Faults as a consumer sees them: no socket at the path, or nothing that answers there as a
croupier agent, is a `ConfigError` naming the path (at the first use, so a mistyped
`CROUPIER_AGENT` fails at once). Later, an agent that falls silent for `SILENCE_S`, or comes
back with another agent id (restarted), makes each open lane fail UNAVAILABLE: `RankClient`
logs it, waits and re-opens the lane from where it is, with no connection of its own to the
server (no silent fallback).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import stat
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import zmq

from croupier.client.agent.protocol import (
    BEAT,
    CALL,
    FETCH,
    HELLO,
    REPLY,
    SESSION,
    SILENCE_S,
    SOCKET_NAME,
    endpoint,
    socket_path,
)
from croupier.client.errors import ClientError, Unavailable, from_status
from croupier.errors import ConfigError
from croupier.proto import pb2

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 30.0
"""How long the first contact waits for the agent to answer."""
SEND_PATIENCE_S = 5.0
"""How long a message waits for the connection to the agent before it is dropped."""


class _Pending:
    __slots__ = ("event", "frames")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.frames: list[bytes] | None = None


class AgentTransport:
    """A `Transport` (see croupier.client.transport) through the agent of `runtime_dir`."""

    def __init__(self, runtime_dir: str | os.PathLike) -> None:
        self.runtime_dir = str(runtime_dir)
        self.path = socket_path(runtime_dir)
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            raise ConfigError(f"no croupier agent socket at {str(self.path)!r} (CROUPIER_AGENT="
                              f"{self.runtime_dir!r}): start `croupier agent --runtime-dir {self.runtime_dir}` "
                              "on this node first") from None
        except NotADirectoryError:
            raise ConfigError(f"CROUPIER_AGENT={self.runtime_dir!r} is not a directory (a node agent's runtime "
                              f"directory, holding its socket {SOCKET_NAME!r}, is expected)") from None
        except OSError as exc:
            raise ConfigError(f"cannot reach a croupier agent socket at {str(self.path)!r} (CROUPIER_AGENT="
                              f"{self.runtime_dir!r}): {exc.strerror or exc}") from None
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"{str(self.path)!r} is not a socket, so no croupier agent serves "
                              f"CROUPIER_AGENT={self.runtime_dir!r}")
        self.pid = os.getpid()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self._sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self._sock.connect(endpoint(runtime_dir))
        self._out: queue.Queue = queue.Queue()
        self._wake_r, self._wake_w = os.pipe()
        self._ids = itertools.count(1)
        self._lane_ids = itertools.count(1)
        self._pending: dict[bytes, _Pending] = {}
        self._lanes: dict[int, _AgentLane] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.agent_id = ""
        self.last_heard = time.monotonic()
        self._thread = threading.Thread(target=self._io, name="croupier-agent-io", daemon=True)
        self._thread.start()
        try:
            frames = self._request([HELLO], HELLO_TIMEOUT_S)
        except Unavailable:
            self.close()
            raise ConfigError(f"nothing answered as a croupier agent at {str(self.path)!r} within "
                              f"{HELLO_TIMEOUT_S:.0f} s (a stale socket of a stopped agent, or not a croupier agent)"
                              ) from None
        self.agent_id = frames[0].decode()
        self.info = json.loads(frames[1])

    # -- I/O thread --------------------------------------------------------------------------------
    def _submit(self, frames: list[bytes]) -> None:
        self._out.put(frames)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _io(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        backlog: deque[tuple[float, list[bytes]]] = deque()
        while not self._closed:
            events = dict(poller.poll(50 if backlog else 500))
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 4096)
                except OSError:
                    pass
            while True:
                try:
                    frames = self._out.get_nowait()
                except queue.Empty:
                    break
                if frames is None:
                    return
                backlog.append((time.monotonic() + SEND_PATIENCE_S, frames))
            # Until the connection to the agent is up (it starts, or restarts), messages wait;
            # past SEND_PATIENCE_S they are dropped: calls time out and retry, acks are re-sent.
            now = time.monotonic()
            while backlog:
                deadline, frames = backlog[0]
                if now > deadline:
                    backlog.popleft()
                    continue
                try:
                    self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                backlog.popleft()
            if self._sock in events:
                while True:
                    try:
                        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(frames)

    def _on_message(self, frames: list[bytes]) -> None:
        self.last_heard = time.monotonic()
        kind = frames[0]
        if kind in (REPLY, HELLO):
            with self._lock:
                p = self._pending.pop(frames[1], None)
            if p is not None:
                p.frames = frames[2:]
                p.event.set()
        elif kind == SESSION:
            agent = frames[1].decode()
            resp = pb2.SessionResponse.FromString(frames[2])
            by_lane: dict[int, pb2.SessionResponse] = {}
            for ls in resp.lanes:
                m = by_lane.setdefault(ls.lane, pb2.SessionResponse())
                m.lanes.append(ls)
            for ev in resp.events:
                by_lane.setdefault(ev.lane, pb2.SessionResponse()).events.append(ev)
            for lane, m in by_lane.items():
                ln = self._lanes.get(lane)
                if ln is not None:
                    ln.deliver(agent, m)
        elif kind == BEAT:
            agent = frames[1].decode()
            for ln in list(self._lanes.values()):
                ln.deliver(agent, None)

    # -- calls -------------------------------------------------------------------------------------
    def _request(self, frames: list[bytes], timeout: float) -> list[bytes]:
        req_id = str(next(self._ids)).encode()
        p = _Pending()
        with self._lock:
            self._pending[req_id] = p
        self._submit([frames[0], req_id, *frames[1:]])
        if not p.event.wait(timeout):
            with self._lock:
                self._pending.pop(req_id, None)
            raise Unavailable(f"the croupier agent at {str(self.path)!r} did not answer within {timeout:.0f} s "
                              "(killed or restarting?)", code=grpc.StatusCode.UNAVAILABLE,
                              details="agent did not answer")
        assert p.frames is not None
        return p.frames

    def unary(self, name: str, request: Any, timeout: float) -> Any:
        frames = self._request([CALL, name.encode(), request.SerializeToString()], timeout)
        code, payload = frames[0], frames[1]
        if code:
            raise from_status(code.decode(), payload.decode(), name)
        return getattr(pb2, f"{name}Response").FromString(payload)

    def fetch(self, shards: np.ndarray, timeout: float = 600.0, source: int | None = None) -> str:
        """Asks the agent to make these shards present in the node cache; returns, once they
        are, the cache directory that holds them (and the dataset's index.json). `source`:
        the mixture source the shards belong to (a mixture job only)."""
        msg = [FETCH, np.ascontiguousarray(shards, dtype="<i8").tobytes()]
        if source is not None:
            msg.append(str(int(source)).encode())
        frames = self._request(msg, timeout)
        if frames[0]:
            raise from_status(frames[0].decode(), frames[1].decode(), "Fetch")
        return frames[1].decode()

    def open_lane(self, job: str, lane: pb2.LaneOpen, ack: int | None) -> _AgentLane:
        with self._lock:
            local = next(self._lane_ids)  # never reused: a late event of an old lane reaches no new one
            spec = pb2.LaneOpen()
            spec.CopyFrom(lane)
            spec.lane = local
            call = _AgentLane(self, local)
            self._lanes[local] = call
        req = pb2.SessionRequest(job=job, open=[spec])
        if ack is not None:
            req.acks.add(lane=local, next_step=ack)
        self._submit([SESSION, req.SerializeToString()])
        return call

    def _drop_lane(self, local: int) -> None:
        with self._lock:
            self._lanes.pop(local, None)

    def close(self) -> None:
        if self._closed or self.pid != os.getpid():
            return
        self._closed = True
        self._out.put(None)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=2.0)
        self._sock.close(0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _AgentLane:
    """One lane through the agent (a `LaneCall`)."""

    def __init__(self, transport: AgentTransport, local: int) -> None:
        self._t = transport
        self.lane = local
        self._q: queue.Queue = queue.Queue()
        self._agent: str | None = None
        self._done = False

    def deliver(self, agent: str, msg: pb2.SessionResponse | None) -> None:
        """From the I/O thread: a message for this lane (None: a heartbeat)."""
        self._q.put((agent, msg))

    def __iter__(self) -> Iterator[pb2.SessionResponse]:
        t = self._t
        try:
            while not self._done:
                try:
                    agent, msg = self._q.get(timeout=0.5)
                except queue.Empty:
                    silent = time.monotonic() - t.last_heard
                    if silent > SILENCE_S and not self._done:
                        raise Unavailable(f"the croupier agent at {str(t.path)!r} has been silent for {silent:.0f} s "
                                          "(killed or hung?); waiting for it to come back",
                                          code=grpc.StatusCode.UNAVAILABLE, details="agent silent") from None
                    continue
                if self._done:
                    return
                if self._agent is None:
                    self._agent = agent
                elif agent != self._agent:
                    raise Unavailable(f"the croupier agent at {str(t.path)!r} restarted (agent {self._agent} is now "
                                      f"{agent}); re-opening the lane", code=grpc.StatusCode.UNAVAILABLE,
                                      details="agent restarted")
                if msg is not None:
                    yield msg
        finally:
            t._drop_lane(self.lane)
            if not self._done:  # a lane given up on this side: the agent must not wait on it
                self.finish()

    def ack(self, next_step: int) -> bool:
        if self._done:
            return False
        req = pb2.SessionRequest(acks=[pb2.LaneAck(lane=self.lane, next_step=next_step)])
        self._t._submit([SESSION, req.SerializeToString()])
        return True

    def finish(self) -> None:
        if not self._done:
            self._t._submit([SESSION, pb2.SessionRequest(close=[self.lane]).SerializeToString()])
            self._done = True
            self._q.put(("", None))

    def cancel(self) -> None:
        self.finish()


__all__ = ["AgentTransport", "ClientError"]
