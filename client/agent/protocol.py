"""The frames a node's consumers and its `croupier agent` exchange over ZeroMQ IPC.

The agent binds a ROUTER socket at `ipc://<runtime dir>/agent.sock`; every consumer (a rank,
or one DataLoader worker of a rank) connects a DEALER socket, created in the process that
uses it (after any fork). Every message is a multipart list of byte frames whose first frame
names its kind:

    consumer -> agent
      HELLO   [b"hello", req_id]                       -> HELLO reply
      CALL    [b"call", req_id, method, request]        a unary croupier.v1 call to forward
      SESSION [b"session", SessionRequest]              lane opens / acks / closes (consumer
                                                        lane ids; the agent maps them)
      FETCH   [b"fetch", req_id, shard ids (<i8 bytes)(, source index)] make these shards (of that
              mixture source, in a mixture job) present in the node
                                                        cache (reply when they are)
    agent -> consumer
      HELLO   [b"hello", req_id, agent_id, info JSON]
      REPLY   [b"reply", req_id, code, payload]         code b"" and the response bytes, or a
                                                        status code name and the error message
      SESSION [b"session", agent_id, SessionResponse]   the consumer's lanes only
      BEAT    [b"beat", agent_id]                       about once a second to every consumer
                                                        with an open lane

`agent_id` changes whenever the agent restarts: a consumer whose lane was opened with
another agent id (or that hears nothing for `SILENCE_S`) re-opens its lanes from where it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from croupier.errors import ConfigError

SOCKET_NAME = "agent.sock"
"""The agent's socket file in its runtime directory."""
INFO_NAME = "agent.json"
"""What the running agent writes about itself (pid, server, node, agent id)."""
STATS_NAME = "stats.json"
"""The agent's counters (node report figures), rewritten every few seconds and at stop."""
LOCK_NAME = "agent.lock"
"""Held (flock) by the running agent: a second agent on the same runtime directory is refused."""
AGENT_ENV = "CROUPIER_AGENT"
"""Environment variable naming the agent's runtime directory for ranks and workers."""

HELLO = b"hello"
CALL = b"call"
SESSION = b"session"
FETCH = b"fetch"
REPLY = b"reply"
BEAT = b"beat"

BEAT_S = 1.0
"""The agent's heartbeat period."""
SILENCE_S = 15.0
"""A consumer that hears nothing from the agent this long treats its lanes as lost."""
CONSUMER_TIMEOUT_S = 60.0
"""The agent closes the lanes of a consumer silent this long (its process is gone)."""
FORWARDED_CALLS = ("GetVersion", "Join", "GetSlice", "Checkpoint", "GetStatus", "ReportLoss")
"""Unary croupier.v1 calls a consumer may make through the agent."""
MAX_IPC_PATH = 100
"""Unix socket paths are limited (108 bytes on Linux, with the terminating NUL)."""


def socket_path(runtime_dir: str | os.PathLike) -> Path:
    return Path(runtime_dir) / SOCKET_NAME


def endpoint(runtime_dir: str | os.PathLike) -> str:
    """The ZeroMQ endpoint of the agent of `runtime_dir`; refuses a path the OS cannot bind."""
    path = socket_path(runtime_dir).absolute()
    if len(str(path)) > MAX_IPC_PATH:
        raise ConfigError(f"agent socket path {str(path)!r} is {len(str(path))} characters; Unix sockets "
                          f"allow at most {MAX_IPC_PATH}: use a shorter --runtime-dir")
    return f"ipc://{path}"
