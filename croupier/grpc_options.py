"""gRPC channel and server options both ends must agree on, in one place.

The client library imports `channel_options()` and `AUTH_METADATA_KEY`; the server uses
`server_options()`. Why these values:

- Message size: the default 4 MiB receive limit is too small for a packed multi-step slice
  message of a big batch, and an unbounded one lets a garbage sender exhaust memory. Both ends
  use 16 MiB; a larger message is refused with RESOURCE_EXHAUSTED.
- Keepalive: a rank that vanishes without closing its stream (node lost, kill -9) must be
  noticed so its stream's waiter is released. Clients ping every 30 s, also without calls in
  flight; the server accepts pings as often as every 10 s (a client pinging more often than the
  server permits gets GOAWAY "too_many_pings"), and itself pings idle clients every 60 s.
- Pending calls: gRPC core holds calls that arrived before the asyncio server took them up,
  and past `grpc.server.max_pending_requests` (default 1,000) it cancels some. A job of 1,024
  ranks that joins and opens its streams at once (start, or every rank reconnecting to a
  restarted server) is such a burst: measured, 1 or 2 ranks in every such start saw their
  new stream CANCELLED. The server keeps MAX_PENDING_CALLS (a burst of 8,192 ranks' Join and
  Session) and refuses only past twice that.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""Largest message either end sends or accepts."""

CLIENT_KEEPALIVE_MS = 30_000
"""How often a client pings the server."""

SERVER_KEEPALIVE_MS = 60_000
"""How often the server pings a client."""

KEEPALIVE_TIMEOUT_MS = 10_000
"""How long either end waits for a ping's answer before closing the connection."""

SERVER_MIN_PING_INTERVAL_MS = 10_000
"""The most frequent client ping the server tolerates; must stay <= CLIENT_KEEPALIVE_MS."""

MAX_PENDING_CALLS = 16_384
"""Calls gRPC core may hold before the server takes them up (a start-up or reconnect burst)."""

AUTH_METADATA_KEY = "authorization"
"""Metadata key carrying `Bearer <token>` when the server requires a token."""


def bearer(token: str) -> tuple[tuple[str, str]]:
    """Call metadata that authenticates with `token`."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


def server_options() -> list[tuple[str, int]]:
    """Options for `grpc.server(...)`."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", 2 * MAX_PENDING_CALLS),
    ]


def channel_options() -> list[tuple[str, int]]:
    """Options for `grpc.insecure_channel(...)` / `grpc.secure_channel(...)` on the client."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", CLIENT_KEEPALIVE_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
