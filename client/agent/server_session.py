"""The node agent's one connection to the sampler server: a grpc.aio channel, the unary
calls it forwards for its consumers, and its one `Session` stream.

The channel comes from the client's one opener (`croupier.client.channel.ChannelConfig`):
TLS, the certificate's server name and the bearer token mean what they mean for a rank.
The stream opens with the first lane to open and ends on any failure (a write refused, the
server ending or breaking the stream): `on_lost` then hears why, once, and the next lane
to open opens a new stream. Every message the server sends goes to `on_response`.

Joins are shared: the DataLoader workers of a rank join together with the same request,
and a Join is idempotent, so requests identical to one in flight wait for its answer
instead of each costing the server a call. Nothing is cached past the call: a later Join
(after a server restart, an elastic change) reaches the server.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from croupier.client.channel import ChannelConfig
from croupier.proto import SERVICE_NAME, pb2

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
"""Deadline of a forwarded unary call."""


class ServerSession:
    """The agent's server side (see the module docstring). Runs on the agent's event loop."""

    def __init__(self, config: ChannelConfig, on_response: Callable[[pb2.SessionResponse], None],
                 on_lost: Callable[[str], None]) -> None:
        self.server = config.address
        self._config = config
        self._metadata = config.metadata()
        self._on_response = on_response
        self._on_lost = on_lost
        self._channel: grpc.aio.Channel | None = None
        self._call: Any = None  # the open Session stream
        self._joins: dict[bytes, asyncio.Future] = {}  # identical Joins in flight share one server call
        self.stats = {"sessions_opened": 0, "session_losses": 0, "messages_from_server": 0,
                      "messages_to_server": 0, "joins_shared": 0}

    def connect(self) -> None:
        """Opens the channel (from the event loop that will use it); reads the TLS certificate."""
        self._channel = self._config.open_aio()

    @property
    def is_open(self) -> bool:
        """Whether the Session stream is open."""
        return self._call is not None

    # -- unary calls -------------------------------------------------------------------------------
    async def call(self, method: str, payload: bytes) -> bytes:
        """One unary croupier.v1 call, request and response serialized; AioRpcError on failure."""
        assert self._channel is not None, "connect() first"
        call = self._channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        return await call(payload, metadata=self._metadata, timeout=CALL_TIMEOUT_S)

    async def join(self, payload: bytes, on_joined: Callable[[pb2.JoinResponse], None]) -> bytes:
        """Forwards a Join, shared with identical ones in flight; `on_joined` hears the answer of
        each call that reached the server, before anyone gets it."""
        pending = self._joins.get(payload)
        if pending is not None:
            self.stats["joins_shared"] += 1
            return await asyncio.shield(pending)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._joins[payload] = fut
        try:
            resp = await self.call("Join", payload)
            on_joined(pb2.JoinResponse.FromString(resp))
            fut.set_result(resp)
            return resp
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a Join nobody shared must not log "never retrieved"
            raise
        finally:
            self._joins.pop(payload, None)

    # -- the stream --------------------------------------------------------------------------------
    def open(self) -> None:
        """Opens the Session stream."""
        assert self._channel is not None, "connect() first"
        stub = self._channel.stream_stream(f"/{SERVICE_NAME}/Session",
                                           request_serializer=pb2.SessionRequest.SerializeToString,
                                           response_deserializer=pb2.SessionResponse.FromString)
        self._call = stub(metadata=self._metadata)
        self.stats["sessions_opened"] += 1
        asyncio.create_task(self._reader(self._call))
        log.info("session opened", extra={"event": "agent_session_open", "server": self.server})

    async def write(self, req: pb2.SessionRequest) -> None:
        """Sends one message on the open stream; a failure loses the session."""
        try:
            await self._call.write(req)
            self.stats["messages_to_server"] += 1
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            self.lose(f"writing to the server failed: {exc}")

    def lose(self, why: str) -> None:
        """Ends the open stream (if any) and tells `on_lost` why."""
        if self._call is None:
            return
        self.stats["session_losses"] += 1
        call, self._call = self._call, None
        call.cancel()
        self._on_lost(why)

    async def _reader(self, call: Any) -> None:
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ConnectionError("the server ended the session")
                self.stats["messages_from_server"] += 1
                self._on_response(resp)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any end of the session is a loss
            if call is self._call:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                self.lose(detail or type(exc).__name__)

    # -- stop --------------------------------------------------------------------------------------
    async def close(self, grace_s: float) -> None:
        """Cancels the stream and closes the channel, waiting at most `grace_s` for it."""
        if self._call is not None:
            self._call.cancel()
        if self._channel is None:
            return
        try:
            await asyncio.wait_for(self._channel.close(), timeout=grace_s)
        except TimeoutError:
            log.error("closing the server channel took over %.0f s; stopping without it", grace_s,
                      extra={"event": "agent_stop_stuck"})


__all__ = ["CALL_TIMEOUT_S", "ServerSession"]
