"""How a rank reaches the sampler: straight over gRPC, or through its node's agent.

`RankClient` talks to a `Transport`: unary calls (Join, Checkpoint, GetStatus, GetSlice) and
lanes (one consumer's slices, acknowledged in-band). `GrpcTransport` opens a gRPC channel to
the server and carries a lane on a `Session` stream of its own; the agent transport
(`croupier.client.agent.transport`) carries both over ZeroMQ to the node agent, which holds
the node's one session with the server. Either way every failure surfaces as a `ClientError`
whose `code` is a gRPC status, so the caller retries transient ones the same way.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from typing import Any, Protocol

import grpc

from croupier.client.channel import ChannelConfig
from croupier.client.errors import from_rpc_error
from croupier.proto import pb2

LANE = 1
"""The lane id a rank's own session uses for its one lane."""


class LaneCall(Protocol):
    """One open lane: iterate for responses, acknowledge in-band, close."""

    def __iter__(self) -> Iterator[pb2.SessionResponse]: ...

    def ack(self, next_step: int) -> bool:
        """Queues an acknowledgement; False when the lane is not connected (nothing sent)."""

    def finish(self) -> None:
        """Closes the lane politely (the server sees it end); the iteration then ends."""

    def cancel(self) -> None:
        """Drops the lane at once."""


class Transport(Protocol):
    """A rank's way to the sampler (see the module docstring)."""

    def unary(self, name: str, request: Any, timeout: float) -> Any: ...

    def open_lane(self, job: str, lane: pb2.LaneOpen, ack: int | None) -> LaneCall: ...

    def close(self) -> None: ...


class _GrpcLane:
    """A lane on its own Session stream."""

    def __init__(self, stub: Any, metadata: Any, job: str, lane: pb2.LaneOpen, ack: int | None) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self.lane = lane.lane
        first = pb2.SessionRequest(job=job, open=[lane])
        if ack is not None:
            first.acks.add(lane=lane.lane, next_step=ack)
        self._outbox.put(first)
        self._call = stub.Session(self._requests(), metadata=metadata)

    def _requests(self) -> Iterator[pb2.SessionRequest]:
        while not self._done.is_set():
            try:
                item = self._outbox.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            yield item

    def __iter__(self) -> Iterator[pb2.SessionResponse]:
        try:
            yield from self._call
        except grpc.RpcError as exc:
            if self._done.is_set() and exc.code() == grpc.StatusCode.CANCELLED:
                return
            raise from_rpc_error(exc, "Session") from None

    def ack(self, next_step: int) -> bool:
        if self._done.is_set():
            return False
        self._outbox.put(pb2.SessionRequest(acks=[pb2.LaneAck(lane=self.lane, next_step=next_step)]))
        return True

    def finish(self) -> None:
        if not self._done.is_set():
            self._outbox.put(pb2.SessionRequest(close=[self.lane]))
            self._outbox.put(None)

    def cancel(self) -> None:
        self._done.set()
        self._outbox.put(None)
        self._call.cancel()


class GrpcTransport:
    """Straight to the server over gRPC (one channel per process: channels do not survive fork).

    metadata: the call metadata (bearer token), resolved by the caller once, at its construction."""

    def __init__(self, config: ChannelConfig, metadata: Any) -> None:
        from croupier.proto.croupier.v1 import croupier_pb2_grpc

        self.address = config.address
        self._metadata = metadata
        self._channel = config.open()
        self._stub = croupier_pb2_grpc.SamplerStub(self._channel)
        self.pid = os.getpid()

    def unary(self, name: str, request: Any, timeout: float) -> Any:
        try:
            return getattr(self._stub, name)(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, name) from None

    def open_lane(self, job: str, lane: pb2.LaneOpen, ack: int | None) -> LaneCall:
        return _GrpcLane(self._stub, self._metadata, job, lane, ack)

    def close(self) -> None:
        if self.pid == os.getpid():
            self._channel.close()


__all__ = ["LANE", "LaneCall", "Transport", "GrpcTransport"]
