"""`croupier agent`: one process per node between the node's consumers and the sampler server.

Every rank and DataLoader worker of the node talks to the agent over ZeroMQ IPC (see
`croupier.client.agent.protocol`); the agent holds the node's one gRPC channel and one
`Session` stream to the server, on which every local consumer is a lane. So the server holds
one stream per node instead of one per worker, acknowledgements of all local lanes travel
together (flow control still holds per rank: each lane is acknowledged for itself), and the
node's shard cache has one owner (`croupier.client.agent.node_cache`).

`NodeAgent` is a composition of its parts, each in its own module:

- `runtime_dir.RuntimeDir`: the runtime directory, its lock (one agent per directory), the
  agent's info and stats files;
- `consumers.ConsumerSocket`: the ZeroMQ socket the consumers talk to, and who is talking;
- `lanes.LaneTable`: consumer lanes mapped onto server lanes (rank feeds, node lanes);
- `server_session.ServerSession`: the gRPC channel, forwarded calls and the Session stream;
- `node_cache.NodeCache`: the node's shard cache.

The agent itself routes consumer messages to those parts, runs the writer (what the lanes
ask for goes to the server in one message, with the node report every few seconds) and
the heartbeat (silent consumers' lanes close; an idle agent may exit).

Faults: when the server goes away, every open lane is reported UNAVAILABLE to its consumer,
which re-joins and re-opens it through the agent with backoff (ranks only see a delay); when
the agent goes away, consumers block and log, and re-open their lanes when an agent is back
on the same runtime directory. A consumer that stays silent past `CONSUMER_TIMEOUT_S` has
its lanes closed. A malformed consumer message (`consumer_frames`) is answered
INVALID_ARGUMENT and counted (`bad_messages` in the agent's stats), and the agent serves on.

Everything runs on one asyncio event loop: zmq.asyncio for the consumers, grpc.aio for the
server. Sample bytes never pass through the agent: consumers read shard files from the node
cache directly and only ask the agent to make them present.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from croupier import __version__
from croupier.client.agent import consumer_frames
from croupier.client.agent.consumers import ConsumerSocket
from croupier.client.agent.lanes import LaneTable, Outbox
from croupier.client.agent.node_cache import MixNodeCache, NodeCache
from croupier.client.agent.protocol import (
    BEAT,
    BEAT_S,
    CONSUMER_TIMEOUT_S,
    FORWARDED_CALLS,
    HELLO,
    REPLY,
    SESSION,
    endpoint,
)
from croupier.client.agent.runtime_dir import AgentLocked, RuntimeDir
from croupier.client.agent.server_session import ServerSession
from croupier.client.channel import ChannelConfig
from croupier.errors import ConfigError
from croupier.proto import pb2

log = logging.getLogger(__name__)

REPORT_S = 5.0
"""How often the agent sends its node report on the session."""
STOP_GRACE_S = 5.0
"""At stop, the most the agent waits for its own tasks and for its server channel to close."""
BAD_LOGGED = 10
"""Refused consumer messages logged one by one; after these, every hundredth."""
STOP_DEADLINE_S = 30.0
"""`run_agent`: a process asked to stop that has not stopped after this long logs its threads'
stacks and exits (status 1), so SIGTERM always ends an agent."""


class NodeAgent:
    """The agent of one node (see the module docstring). `run()` serves until `stop()`.

    server: "host:port" of the sampler server; token, tls_root_cert, tls_server_name: how to
    reach it (`croupier.client.channel.ChannelConfig`). runtime_dir: where consumers find the
    agent. cache_dir, cache_limit: the node's shard cache. job: the job served ("": whatever
    the ranks join). node: the name shown in status (default: the host name). idle_exit_s:
    exit after this long without consumers (0: never). local_ranks: ranks on the node (0:
    unknown), whose lanes open together as one.
    """

    def __init__(self, server: str, runtime_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                 cache_limit: int | None = None, job: str = "", token: str | None = None,
                 tls_root_cert: str | None = None, node: str | None = None, idle_exit_s: float = 0.0,
                 local_ranks: int = 0, tls_server_name: str | None = None) -> None:
        if not server or ":" not in server:
            raise ConfigError(f"agent --server must be host:port, got {server!r}")
        if local_ranks < 0:
            raise ConfigError(f"local ranks must be >= 0 (0: unknown), got {local_ranks}")
        self.server = server
        self.runtime_dir = Path(runtime_dir)
        self.cache_dir = Path(cache_dir)
        self.cache_limit = cache_limit
        self.job = job
        self.node = node or socket.gethostname()
        self.agent_id = uuid.uuid4().hex[:12]
        self.idle_exit_s = float(idle_exit_s)
        self.local_ranks = int(local_ranks)
        self.cache: Any = None  # the node cache (a MixNodeCache once a rank joins a mixture)
        self.on_stop: Callable[[], None] | None = None  # run_agent arms its stop deadline here
        self._dir = RuntimeDir(self.runtime_dir)
        self._consumers = ConsumerSocket(endpoint(self.runtime_dir))
        self._session = ServerSession(ChannelConfig(server, tls_root_cert, tls_server_name, token),
                                      on_response=self._on_server_message, on_lost=self._on_session_lost)
        self._lanes = LaneTable(self.agent_id, self.local_ranks, cache=lambda: self.cache,
                                session_open=lambda: self._session.is_open)
        self._flush = asyncio.Event()  # the writer has work
        self._open_timer: asyncio.TimerHandle | None = None  # wakes the writer when waiting opens are due
        self._stopping = asyncio.Event()
        self._calls = 0
        self._bad_messages = 0  # consumer messages refused (malformed, or failed in the agent)
        self._tasks: set[asyncio.Task] = set()  # consumer requests in flight (calls, fetches)

    # -- counters ----------------------------------------------------------------------------------
    def stats_now(self) -> dict[str, Any]:
        """The agent's counters: its node report's figures and its own."""
        r = self._report()
        return {"node": r.node, "agent_id": r.agent_id, "consumers": r.consumers,
                "lanes": self._lanes.lane_count, "ranks": self._lanes.rank_count,
                "bytes_downloaded": r.bytes_downloaded, "shards_downloaded": r.shards_downloaded,
                "cache_hits": r.cache_hits, "cache_misses": r.cache_misses, "cache_bytes": r.cache_bytes,
                "cache_limit": r.cache_limit, "calls": self._calls, "bad_messages": self._bad_messages,
                **self._session.stats}

    def write_stats(self) -> None:
        """Writes `stats_now()` to <runtime dir>/stats.json (every report period and at stop)."""
        try:
            self._dir.write_stats(self.stats_now())
        except OSError as exc:
            log.warning("cannot write agent stats: %s", exc, extra={"event": "agent_stats_failed"})

    def _report(self) -> pb2.NodeReport:
        r = pb2.NodeReport(node=self.node, agent_id=self.agent_id, consumers=self._consumers.count)
        if self.cache is not None:
            s = self.cache.stats()
            r.bytes_downloaded = int(s["bytes_downloaded"])
            r.cache_hits = int(s["hits"])
            r.cache_misses = int(s["misses"])
            r.cache_bytes = int(s["cache_bytes"])
            r.cache_limit = int(self.cache_limit or 0)
            r.shards_downloaded = int(s["shards_downloaded"])
        return r

    # -- lifetime ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Asks a running `run()` to return (from the agent's loop); calls `on_stop` once."""
        if not self._stopping.is_set() and self.on_stop is not None:
            self.on_stop()
        self._stopping.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        self._dir.take()
        self.cache = NodeCache(self.cache_dir, self.cache_limit)
        self._consumers.bind(self._dir.socket)
        self._session.connect()
        self._dir.write_info({"pid": os.getpid(), "agent_id": self.agent_id, "server": self.server,
                              "node": self.node, "job": self.job, "cache_dir": str(self.cache_dir),
                              "cache_limit": self.cache_limit or 0, "version": __version__})
        log.info("agent serving", extra={"event": "agent_start", "endpoint": self._consumers.endpoint,
                                         "server": self.server, "node": self.node, "agent_id": self.agent_id})
        tasks = [asyncio.create_task(self._consumers.serve(self._on_message, self._stopping.is_set)),
                 asyncio.create_task(self._writer()), asyncio.create_task(self._beats())]
        if ready is not None:
            ready.set()
        try:
            await self._stopping.wait()
        finally:
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
            if stuck:
                log.error("agent tasks did not stop within %.0f s: %s; stopping without them", STOP_GRACE_S,
                          sorted(getattr(t.get_coro(), "__qualname__", t.get_name()) for t in stuck),
                          extra={"event": "agent_stop_stuck"})
            await self._session.close(STOP_GRACE_S)
            self._consumers.close()
            self.write_stats()
            self.cache.close()
            self._dir.release()
            log.info("agent stopped", extra={"event": "agent_stop", "agent_id": self.agent_id})

    # -- consumers ---------------------------------------------------------------------------------
    def _send(self, identity: bytes, frames: list[bytes]) -> None:
        asyncio.create_task(self._consumers.send(identity, frames))

    def _send_session(self, out: Outbox) -> None:
        agent = self.agent_id.encode()
        for identity, m in out.items():
            self._send(identity, [SESSION, agent, m.SerializeToString()])

    async def _on_message(self, identity: bytes, frames: list[bytes]) -> None:
        """Handles one consumer message. A malformed one (`consumer_frames.parse`) is answered
        INVALID_ARGUMENT and counted; a message whose handling fails is answered INTERNAL and
        counted: nothing a consumer sends ends in an unanswered exception."""
        try:
            msg = consumer_frames.parse(frames)
        except consumer_frames.BadFrame as bad:
            await self._refuse(identity, bad.req_id, b"INVALID_ARGUMENT", str(bad))
            return
        try:
            await self._handle(identity, msg)
        except Exception as exc:  # noqa: BLE001 - one consumer's message must not stop the node's agent
            req_id = getattr(msg, "req_id", b"")
            log.exception("a consumer message failed", extra={"event": "consumer_message_failed"})
            await self._refuse(identity, req_id, b"INTERNAL", f"the node agent failed on this message: {exc}")

    async def _refuse(self, identity: bytes, req_id: bytes, code: bytes, message: str) -> None:
        """Answers a message the agent will not serve (a REPLY; request id b"" when it had none) and
        counts it; logs the first few and then every hundredth, so a flood does not flood the log."""
        self._bad_messages += 1
        if self._bad_messages <= BAD_LOGGED or self._bad_messages % 100 == 0:
            log.warning("refused a consumer message (%d so far): %s", self._bad_messages, message,
                        extra={"event": "bad_consumer_message", "code": code.decode()})
        await self._consumers.send(identity, [REPLY, req_id, code, message.encode()])

    async def _handle(self, identity: bytes, msg: consumer_frames.Message) -> None:
        if isinstance(msg, consumer_frames.Hello):
            info = {"agent_id": self.agent_id, "node": self.node, "server": self.server, "version": __version__,
                    "cache_dir": str(self.cache_dir)}
            await self._consumers.send(identity, [HELLO, msg.req_id, self.agent_id.encode(), json.dumps(info).encode()])
        elif isinstance(msg, consumer_frames.Call):
            self._spawn(self._forward_call(identity, msg.req_id, msg.method, msg.payload), identity, msg.req_id)
        elif isinstance(msg, consumer_frames.Session):
            refused = consumer_frames.bad_opens(msg.request) + consumer_frames.bad_acks(msg.request)
            for event in refused:
                await self._refuse_lane(identity, event)
            out = self._lanes.on_request(identity, msg.request)
            if out.lanes or out.events:
                self._send_session({identity: out})
            self._flush.set()
        else:
            self._spawn(self._fetch(identity, msg.req_id, msg.shards, msg.source), identity, msg.req_id)

    async def _refuse_lane(self, identity: bytes, event: pb2.LaneEvent) -> None:
        """A malformed lane open or acknowledgement: refused on its lane (a session event), counted."""
        self._bad_messages += 1
        if self._bad_messages <= BAD_LOGGED or self._bad_messages % 100 == 0:
            log.warning("refused a consumer lane request (%d so far): %s", self._bad_messages, event.error,
                        extra={"event": "bad_consumer_message", "code": event.error_code})
        self._send_session({identity: pb2.SessionResponse(events=[event])})

    def _spawn(self, work: Coroutine[Any, Any, None], identity: bytes, req_id: bytes) -> None:
        """Runs a consumer request's work as a task whose failure is answered, never left unretrieved."""
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if t.cancelled() or t.exception() is None:
                return
            log.error("a consumer request failed: %r", t.exception(), exc_info=t.exception(),
                      extra={"event": "consumer_message_failed"})
            if not self._stopping.is_set():
                asyncio.ensure_future(self._refuse(identity, req_id, b"INTERNAL",
                                                   f"the node agent failed on this request: {t.exception()}"))

        task.add_done_callback(done)

    async def _forward_call(self, identity: bytes, req_id: bytes, method: str, payload: bytes) -> None:
        self._calls += 1
        if method not in FORWARDED_CALLS:
            await self._refuse(identity, req_id, b"INVALID_ARGUMENT",
                               f"the agent forwards {list(FORWARDED_CALLS)}, not {method!r}")
            return
        try:
            if method == "Join":
                resp = await self._session.join(payload, self._note_join)
            else:
                resp = await self._session.call(method, payload)
        except grpc.aio.AioRpcError as exc:
            await self._consumers.send(identity, [REPLY, req_id, exc.code().name.encode(),
                                                  (exc.details() or "").encode()])
            return
        await self._consumers.send(identity, [REPLY, req_id, b"", resp])

    def _note_join(self, resp: pb2.JoinResponse) -> None:
        """A rank joined: the node cache learns the job's dataset (or sources) from it, and the
        lane table the per-rank batch (how many ranks one server lane may carry)."""
        if resp.per_rank_batch > 0:
            self._lanes.rank_batch = int(resp.per_rank_batch)
        if self.cache is not None and len(resp.job.sources) > 1:
            if isinstance(self.cache, MixNodeCache):
                if not self.cache.matches(list(resp.job.sources)):
                    log.error("a rank joined a job with other sources than this agent's cache serves",
                              extra={"event": "cache_sources_changed"})
            elif not self.cache.is_open:  # sources open on the consumers' first fetches
                self.cache = MixNodeCache(self.cache_dir, self.cache_limit, list(resp.job.sources))
            return
        if self.cache is not None and resp.job.dataset_remote and not self.cache.is_open:
            self.cache.configure(resp.job.dataset_remote, resp.job.dataset_fingerprint or None)
            asyncio.create_task(self._open_cache())

    async def _open_cache(self) -> None:
        """Opens the node cache (fetches index.json once) off the event loop."""
        try:
            await asyncio.to_thread(self.cache.store)
        except Exception as exc:  # noqa: BLE001 - consumers' fetches report it again
            log.error("cannot open the node cache: %s", exc, extra={"event": "cache_open_failed"})

    async def _fetch(self, identity: bytes, req_id: bytes, shards: np.ndarray, source: int | None = None) -> None:
        try:
            if source is not None and not isinstance(self.cache, MixNodeCache):
                raise ConfigError(f"a fetch names source {source}, but this agent's job is not a mixture")
            if source is None and isinstance(self.cache, MixNodeCache):
                raise ConfigError("this agent serves a mixture job: a fetch must name its source")
            cache = self.cache if source is None else self.cache.source(source)
            await asyncio.to_thread(cache.ensure, shards)
            local = await asyncio.to_thread(lambda: str(cache.local_dir))
        except Exception as exc:  # noqa: BLE001 - reported to the consumer, which raises it
            code = b"FAILED_PRECONDITION" if isinstance(exc, ConfigError) else b"DATA_LOSS"
            await self._consumers.send(identity, [REPLY, req_id, code, str(exc).encode()])
            return
        await self._consumers.send(identity, [REPLY, req_id, b"", local.encode()])

    async def _beats(self) -> None:
        """Every BEAT_S: consumers silent too long are gone (their lanes close), the others with
        lanes hear a beat; an agent without consumers for `idle_exit_s` stops."""
        agent = self.agent_id.encode()
        idle_since = time.monotonic()
        while not self._stopping.is_set():
            await asyncio.sleep(BEAT_S)
            now = time.monotonic()
            if self._consumers.count:
                idle_since = now
            elif self.idle_exit_s and now - idle_since > self.idle_exit_s:
                log.info("no consumer for %.0f s: exiting", now - idle_since, extra={"event": "agent_idle_exit"})
                self.stop()
            for identity, silent_s in self._consumers.take_silent(now, CONSUMER_TIMEOUT_S):
                log.info("consumer silent for %.0f s; its lanes are closed", silent_s,
                         extra={"event": "consumer_gone"})
                self._lanes.close_consumer(identity)
                self._flush.set()
            for identity in self._consumers.consumers():
                if self._lanes.has_lanes(identity):
                    await self._consumers.send(identity, [BEAT, agent])

    # -- the server --------------------------------------------------------------------------------
    async def _writer(self) -> None:
        """Sends what consumers asked for (opens, aggregated acks, closes) on the session."""
        last_report = 0.0
        while not self._stopping.is_set():
            await _wait_event(self._flush, REPORT_S)
            if self._stopping.is_set():
                return
            self._flush.clear()
            req, wait = self._lanes.next_request()
            if wait is not None and self._open_timer is None:
                def due() -> None:
                    self._open_timer = None
                    self._flush.set()
                self._open_timer = asyncio.get_running_loop().call_later(wait, due)
            now = time.monotonic()
            if now - last_report >= REPORT_S:
                req.node.CopyFrom(self._report())
                last_report = now
                await asyncio.to_thread(self.write_stats)
            if not (req.open or req.acks or req.close or req.HasField("node")):
                continue
            if not self._session.is_open:
                if not req.open:
                    continue  # nothing open: acks and closes of a lost session are moot
                self._session.open()
                req.job = self._lanes.job
                req.node.CopyFrom(self._report())
            await self._session.write(req)

    def _on_server_message(self, resp: pb2.SessionResponse) -> None:
        self._send_session(self._lanes.dispatch(resp))

    def _on_session_lost(self, why: str) -> None:
        """The server session ended: every open lane is reported UNAVAILABLE to its consumer,
        which re-opens it (a new session opens with the first re-opened lane)."""
        log.warning("server session lost (%s); %d lanes told to reconnect", why, self._lanes.lane_count,
                    extra={"event": "agent_session_lost", "server": self.server})
        self._send_session(self._lanes.lose(why))


async def _wait_event(event: asyncio.Event, timeout: float) -> None:
    """Waits until `event` is set or `timeout` passes. Unlike `asyncio.wait_for` in Python 3.11,
    a cancellation that arrives as the event fires is never swallowed (wait_for then returns the
    event's result and the cancelled task runs on), so a stopping agent's tasks do end."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=timeout)
    finally:
        waiter.cancel()


def run_agent(agent: NodeAgent, deadline_s: float = STOP_DEADLINE_S) -> None:
    """Runs `agent` in this thread until SIGTERM / SIGINT (or its idle exit). A stop that has
    not finished `deadline_s` after it was asked for is a fault: the agent logs it with every
    thread's stack, removes its socket and exits with status 1 (the directory lock goes with the
    process), so a supervisor's SIGTERM always ends it."""
    import signal

    watchdog: list[threading.Timer] = []

    def arm() -> None:
        t = threading.Timer(deadline_s, _stop_timed_out, args=(agent, deadline_s))
        t.daemon = True
        t.start()
        watchdog.append(t)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    agent.on_stop = arm
    try:
        asyncio.run(main())
    finally:
        for t in watchdog:
            t.cancel()


def _stop_timed_out(agent: NodeAgent, deadline_s: float) -> None:
    import faulthandler
    import sys

    log.error("the agent did not stop within %.0f s of being asked to; exiting (thread stacks on stderr)",
              deadline_s, extra={"event": "agent_stop_timeout", "agent_id": agent.agent_id})
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    agent._dir.remove_socket()
    os._exit(1)


__all__ = ["AgentLocked", "NodeAgent", "run_agent"]
