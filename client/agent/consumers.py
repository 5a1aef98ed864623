"""The node agent's consumer side: the ZeroMQ socket every rank and DataLoader worker of the
node talks to, and who is talking.

The agent binds a ROUTER socket at its runtime directory (`croupier.client.agent.protocol`
has the frames); each consumer is known by its socket identity from its first message on.
`serve` reads messages and hands them, in order, to the agent; the messages already queued
are handled in one go (up to `DRAIN_MAX`) before the agent's writer runs, so the
acknowledgements of a node's ranks that arrive together leave in one session message,
without any added delay. `send` never blocks: a consumer whose queue is full loses the
message (it re-opens on silence). A consumer silent past `CONSUMER_TIMEOUT_S` is gone
(`take_silent`): its process died.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

log = logging.getLogger(__name__)

DRAIN_MAX = 256
"""Consumer messages the agent handles in one go (those already queued on its socket) before
its writer sends what they asked for."""

Handler = Callable[[bytes, list[bytes]], Awaitable[None]]
"""Handles one message: the consumer's identity and the message's frames."""


class ConsumerSocket:
    """The agent's socket and its consumers' last-seen times (see the module docstring)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._last_seen: dict[bytes, float] = {}  # consumer identity -> when it last spoke

    def bind(self, socket_file: str | os.PathLike[str]) -> None:
        """Binds the socket (from the event loop that serves it); the socket file is made 0600."""
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.bind(self.endpoint)
        os.chmod(socket_file, 0o600)
        self._sock = sock

    @property
    def count(self) -> int:
        """Consumers known (heard from, not yet found silent)."""
        return len(self._last_seen)

    def consumers(self) -> list[bytes]:
        return list(self._last_seen)

    async def send(self, identity: bytes, frames: list[bytes]) -> None:
        assert self._sock is not None, "bind() first"
        try:
            await self._sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("consumer queue full; message dropped")

    async def serve(self, handle: Handler, stopping: Callable[[], bool]) -> None:
        """Reads messages until `stopping()`, handling each in order; a message that fails is
        logged and the next one is read."""
        assert self._sock is not None, "bind() first"
        while not stopping():
            frames = await self._sock.recv_multipart()
            for n in range(1, DRAIN_MAX + 1):
                self._last_seen[frames[0]] = time.monotonic()
                try:
                    await handle(frames[0], frames[1:])
                except Exception:  # noqa: BLE001 - one bad message must not stop the node
                    log.exception("bad message from a consumer", extra={"event": "bad_consumer_message"})
                if n == DRAIN_MAX:
                    break
                try:
                    frames = await self._sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break

    def take_silent(self, now: float, timeout_s: float) -> list[tuple[bytes, float]]:
        """Forgets and returns the consumers silent for over `timeout_s`, with how long each was."""
        gone = [(identity, now - seen) for identity, seen in self._last_seen.items() if now - seen > timeout_s]
        for identity, _ in gone:
            del self._last_seen[identity]
        return gone

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        if self._ctx is not None:
            self._ctx.term()


__all__ = ["DRAIN_MAX", "ConsumerSocket", "Handler"]
