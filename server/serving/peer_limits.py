"""Per-peer admission limits of the sampler service: open streams and unary calls in flight.

One misbehaving client (a leak of streams, a retry storm) must not exhaust the server for
every other rank, so the servicer admits each call against its peer's (connection's) count
and refuses the one over the limit with RESOURCE_EXHAUSTED, naming the limit. The servicer
runs on one asyncio loop, so the counts need no lock.
"""

from __future__ import annotations

from croupier.errors import ConfigError

__all__ = ["DEFAULT_CALLS_PER_PEER", "DEFAULT_STREAMS_PER_PEER", "PeerLimits"]

DEFAULT_STREAMS_PER_PEER = 4096
"""Most streams one connection may hold open (a rank's DataLoader workers, a node agent's ranks)."""
DEFAULT_CALLS_PER_PEER = 1024
"""Most unary calls one connection may have in flight."""


class PeerLimits:
    """Per-peer (per-connection) limits on open streams and in-flight unary calls."""

    def __init__(self, max_streams: int, max_calls: int) -> None:
        if max_streams < 1 or max_calls < 1:
            raise ConfigError(f"per-peer limits must be >= 1, got streams {max_streams}, calls {max_calls}")
        self.max_streams = max_streams
        self.max_calls = max_calls
        self.streams: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def acquire(self, peer: str, streaming: bool) -> str | None:
        """None when admitted; else the refusal naming the limit."""
        table, limit, what = ((self.streams, self.max_streams, "open streams") if streaming
                              else (self.calls, self.max_calls, "calls in flight"))
        n = table.get(peer, 0)
        if n >= limit:
            return f"peer {peer} already has {n} {what}; the limit is {limit} per peer"
        table[peer] = n + 1
        return None

    def release(self, peer: str, streaming: bool) -> None:
        table = self.streams if streaming else self.calls
        n = table.get(peer, 0) - 1
        if n > 0:
            table[peer] = n
        else:
            table.pop(peer, None)

    def open_streams(self) -> int:
        return sum(self.streams.values())
