"""`croupier agent`: one process per node between the node's consumers and the sampler server.

Every rank and DataLoader worker of the node talks to the agent over ZeroMQ IPC (see
`croupier.client.agent.protocol`); the agent holds the node's one gRPC channel and one
`Session` stream to the server, on which every local consumer is a lane. So the server holds
one stream per node instead of one per worker, acknowledgements of all local lanes travel
together (flow control still holds per rank: each lane is acknowledged for itself), and the
node's shard cache has one owner (`croupier.client.agent.node_cache`).

Faults: when the server goes away, every open lane is reported UNAVAILABLE to its consumer,
which re-joins and re-opens it through the agent with backoff (ranks only see a delay); when
the agent goes away, consumers block and log, and re-open their lanes when an agent is back
on the same runtime directory. A consumer that stays silent past `CONSUMER_TIMEOUT_S` has
its lanes closed.

Everything runs on one asyncio event loop: zmq.asyncio for the consumers, grpc.aio for the
server. Sample bytes never pass through the agent: consumers read shard files from the node
cache directly and only ask the agent to make them present.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import grpc
import numpy as np
import zmq
import zmq.asyncio

from croupier import __version__
from croupier.client.agent.node_cache import MixNodeCache
from croupier.client.agent.protocol import (BEAT, BEAT_S, CALL, CONSUMER_TIMEOUT_S, FETCH, FORWARDED_CALLS, HELLO,
                                            INFO_NAME, LOCK_NAME, REPLY, SESSION, STATS_NAME, endpoint, socket_path)
from croupier.client.channel import ChannelConfig
from croupier.client.rank_feed import RankFeed
from croupier.errors import ConfigError
from croupier.format.atomic import write_bytes_atomic
from croupier.proto import SERVICE_NAME, pack_ids, pb2, slice_ids

log = logging.getLogger(__name__)

REPORT_S = 5.0
"""How often the agent sends its node report on the session."""
OPEN_SETTLE_S = 0.2
"""New rank feeds wait this long after the latest one for more to open in the same node lane
(when the node's rank count is not known)."""
OPEN_WAIT_S = 10.0
"""The most a new rank feed waits for the node's other ranks before its lane opens anyway."""
ACK_SHARE = 4
"""A node lane's acknowledgement goes to the server when its slowest rank moved a quarter of
the lookahead (at least one step): the server still holds three quarters of the window to
send meanwhile, and the node's acks cost the server a message every few steps, not several
per step."""
DRAIN_MAX = 256
"""Consumer messages the agent handles in one go (those already queued on its socket) before
its writer sends what they asked for: the acknowledgements of a node's ranks that arrive
together leave in one session message, without any added delay."""
HEARTBEAT_S = 5.0
"""A rank feed re-sends an unchanged position at most this often (the rank stays live)."""
STOP_GRACE_S = 5.0
"""At stop, the most the agent waits for its own tasks and for its server channel to close."""
STOP_DEADLINE_S = 30.0
"""`run_agent`: a process asked to stop that has not stopped after this long logs its threads'
stacks and exits (status 1), so SIGTERM always ends an agent."""


@dataclass
class _Consumer:
    identity: bytes
    last_seen: float = field(default_factory=time.monotonic)
    # consumer lane id -> a session lane id (a pass-through lane) or a rank feed's key
    lanes: dict[int, "int | tuple[int, int]"] = field(default_factory=dict)


@dataclass
class _Lane:
    consumer: bytes
    local: int
    rank: int


class AgentLocked(ConfigError):
    """Another agent holds the runtime directory."""


class NodeAgent:
    """The agent of one node (see the module docstring). `run()` serves until `stop()`."""

    def __init__(self, server: str, runtime_dir: str | os.PathLike, cache_dir: str | os.PathLike,
                 cache_limit: int | None = None, job: str = "", token: str | None = None,
                 tls_root_cert: str | None = None, node: str | None = None, idle_exit_s: float = 0.0,
                 local_ranks: int = 0, tls_server_name: str | None = None) -> None:
        if not server or ":" not in server:
            raise ConfigError(f"agent --server must be host:port, got {server!r}")
        self.server = server
        self.runtime_dir = Path(runtime_dir)
        self.cache_dir = Path(cache_dir)
        self.cache_limit = cache_limit
        self.job = job
        self.node = node or socket.gethostname()
        self.agent_id = uuid.uuid4().hex[:12]
        self.idle_exit_s = float(idle_exit_s)
        if local_ranks < 0:
            raise ConfigError(f"local ranks must be >= 0 (0: unknown), got {local_ranks}")
        self.local_ranks = int(local_ranks)
        self._channel_config = ChannelConfig(server, tls_root_cert, tls_server_name, token)
        self._metadata = self._channel_config.metadata()
        self._endpoint = endpoint(self.runtime_dir)
        self._lock_fd: int | None = None
        self._consumers: dict[bytes, _Consumer] = {}
        self._lanes: dict[int, _Lane] = {}  # pass-through lanes (read-only readers), by session lane
        self._feeds: dict[tuple[int, int], RankFeed] = {}  # (rank, world) -> its feed
        self._feed_lanes: dict[int, list[RankFeed]] = {}  # session lane -> its feeds, in rank order
        self._feed_opens: list[RankFeed] = []  # feeds whose server lane is to open (grouped by the writer)
        self._opens_first = 0.0  # when the oldest new feed of _feed_opens was queued
        self._opens_last = 0.0  # when the latest was
        self._open_timer: asyncio.TimerHandle | None = None  # wakes the writer when waiting opens are due
        self._next_lane = 1
        self._pending = pb2.SessionRequest()
        self._acks: dict[int, int] = {}
        self._lane_sent: dict[int, int] = {}  # server lane -> its slowest rank's position last sent
        self._joins: dict[bytes, asyncio.Future] = {}  # identical Joins in flight share one server call
        self._flush = asyncio.Event()
        self._session: Any = None
        self._session_job = ""
        self._stopping = asyncio.Event()
        self.on_stop: Callable[[], None] | None = None  # run_agent arms its stop deadline here
        self.cache: Any = None
        self.stats = {"calls": 0, "sessions_opened": 0, "session_losses": 0, "messages_from_server": 0,
                      "messages_to_server": 0, "joins_shared": 0}

    # -- lifetime ----------------------------------------------------------------------------------
    def _take_runtime_dir(self) -> None:
        """Creates the runtime directory (0700) and takes its lock; refuses a second agent."""
        try:
            self.runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.runtime_dir, 0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create the agent runtime directory {str(self.runtime_dir)!r}: "
                              f"{exc.strerror}") from None
        fd = os.open(self.runtime_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        for attempt in range(10):  # a rank probing the lock holds it for an instant
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                time.sleep(0.1)
        else:
            os.close(fd)
            holder = ""
            try:
                holder = json.loads((self.runtime_dir / INFO_NAME).read_text()).get("pid", "")
            except (OSError, ValueError):
                pass
            raise AgentLocked(f"another croupier agent (pid {holder or '?'}) already serves the runtime directory "
                              f"{str(self.runtime_dir)!r}; one agent per node and runtime directory") from None
        self._lock_fd = fd
        sock = socket_path(self.runtime_dir)
        if sock.exists() or sock.is_symlink():
            sock.unlink()  # a killed agent's socket: the lock says nobody serves it

    def _write_info(self) -> None:
        info = {"pid": os.getpid(), "agent_id": self.agent_id, "server": self.server, "node": self.node,
                "job": self.job, "cache_dir": str(self.cache_dir), "cache_limit": self.cache_limit or 0,
                "version": __version__}
        write_bytes_atomic(self.runtime_dir / INFO_NAME, json.dumps(info).encode())

    def stats_now(self) -> dict[str, Any]:
        """The agent's counters: its node report's figures and its own."""
        r = self._report()
        return {"node": r.node, "agent_id": r.agent_id, "consumers": r.consumers,
                "lanes": len(self._lanes) + len(self._feed_lanes),
                "ranks": len(self._feeds),
                "bytes_downloaded": r.bytes_downloaded, "shards_downloaded": r.shards_downloaded,
                "cache_hits": r.cache_hits, "cache_misses": r.cache_misses, "cache_bytes": r.cache_bytes,
                "cache_limit": r.cache_limit, **self.stats}

    def write_stats(self) -> None:
        """Writes `stats_now()` to <runtime dir>/stats.json (every report period and at stop)."""
        try:
            write_bytes_atomic(self.runtime_dir / STATS_NAME, json.dumps(self.stats_now()).encode())
        except OSError as exc:
            log.warning("cannot write agent stats: %s", exc, extra={"event": "agent_stats_failed"})

    def stop(self) -> None:
        """Asks a running `run()` to return (from the agent's loop); calls `on_stop` once."""
        if not self._stopping.is_set() and self.on_stop is not None:
            self.on_stop()
        self._stopping.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        self._take_runtime_dir()
        from croupier.client.agent.node_cache import NodeCache

        self.cache = NodeCache(self.cache_dir, self.cache_limit)
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.bind(self._endpoint)
        os.chmod(socket_path(self.runtime_dir), 0o600)
        self._sock = sock
        self._channel = self._channel_config.open_aio()
        self._write_info()
        log.info("agent serving", extra={"event": "agent_start", "endpoint": self._endpoint, "server": self.server,
                                         "node": self.node, "agent_id": self.agent_id})
        tasks = [asyncio.create_task(self._serve_consumers()), asyncio.create_task(self._writer()),
                 asyncio.create_task(self._beats())]
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
                          sorted(t.get_coro().__qualname__ for t in stuck), extra={"event": "agent_stop_stuck"})
            if self._session is not None:
                self._session.cancel()
            try:
                await asyncio.wait_for(self._channel.close(), timeout=STOP_GRACE_S)
            except asyncio.TimeoutError:
                log.error("closing the server channel took over %.0f s; stopping without it", STOP_GRACE_S,
                          extra={"event": "agent_stop_stuck"})
            sock.close(0)
            ctx.term()
            self.write_stats()
            self.cache.close()
            try:
                socket_path(self.runtime_dir).unlink()
            except OSError:
                pass
            if self._lock_fd is not None:
                os.close(self._lock_fd)
            log.info("agent stopped", extra={"event": "agent_stop", "agent_id": self.agent_id})

    # -- consumers ---------------------------------------------------------------------------------
    async def _send(self, identity: bytes, frames: list[bytes]) -> None:
        try:
            await self._sock.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.debug("consumer queue full; message dropped")

    async def _serve_consumers(self) -> None:
        while not self._stopping.is_set():
            frames = await self._sock.recv_multipart()
            for n in range(1, DRAIN_MAX + 1):
                try:
                    await self._on_message(frames[0], frames[1:])
                except Exception:  # noqa: BLE001 - one bad message must not stop the node
                    log.exception("bad message from a consumer", extra={"event": "bad_consumer_message"})
                if n == DRAIN_MAX:
                    break
                try:
                    frames = await self._sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break

    async def _on_message(self, identity: bytes, frames: list[bytes]) -> None:
        c = self._consumers.get(identity)
        if c is None:
            c = self._consumers[identity] = _Consumer(identity)
        c.last_seen = time.monotonic()
        kind = frames[0]
        if kind == HELLO:
            info = {"agent_id": self.agent_id, "node": self.node, "server": self.server, "version": __version__,
                    "cache_dir": str(self.cache_dir)}
            await self._send(identity, [HELLO, frames[1], self.agent_id.encode(), json.dumps(info).encode()])
        elif kind == CALL:
            asyncio.create_task(self._forward_call(identity, frames[1], frames[2].decode(), frames[3]))
        elif kind == SESSION:
            self._on_session_request(c, pb2.SessionRequest.FromString(frames[1]))
        elif kind == FETCH:
            source = int(frames[3]) if len(frames) > 3 else None
            asyncio.create_task(self._fetch(identity, frames[1], frames[2], source))
        else:
            log.warning("unknown message kind %r from a consumer", kind[:20])

    async def _forward_call(self, identity: bytes, req_id: bytes, method: str, payload: bytes) -> None:
        self.stats["calls"] += 1
        if method not in FORWARDED_CALLS:
            await self._send(identity, [REPLY, req_id, b"INVALID_ARGUMENT",
                                        f"the agent forwards {list(FORWARDED_CALLS)}, not {method!r}".encode()])
            return
        try:
            if method == "Join":
                resp = await self._join(payload)
            else:
                resp = await self._call(method, payload)
        except grpc.aio.AioRpcError as exc:
            await self._send(identity, [REPLY, req_id, exc.code().name.encode(), (exc.details() or "").encode()])
            return
        await self._send(identity, [REPLY, req_id, b"", resp])

    async def _call(self, method: str, payload: bytes) -> bytes:
        call = self._channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        return await call(payload, metadata=self._metadata, timeout=30.0)

    async def _join(self, payload: bytes) -> bytes:
        """Forwards a Join; the DataLoader workers of a rank join together with the same request,
        and a Join is idempotent, so requests identical to one in flight wait for its answer
        instead of each costing the server a call. Nothing is cached past the call: a later Join
        (after a server restart, an elastic change) reaches the server."""
        pending = self._joins.get(payload)
        if pending is not None:
            self.stats["joins_shared"] += 1
            return await asyncio.shield(pending)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._joins[payload] = fut
        try:
            resp = await self._call("Join", payload)
            self._note_join(pb2.JoinResponse.FromString(resp))
            fut.set_result(resp)
            return resp
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: a Join nobody shared must not log "never retrieved"
            raise
        finally:
            self._joins.pop(payload, None)

    def _note_join(self, resp: pb2.JoinResponse) -> None:
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

    async def _fetch(self, identity: bytes, req_id: bytes, payload: bytes, source: int | None = None) -> None:
        shards = np.frombuffer(payload, dtype="<i8")
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
            await self._send(identity, [REPLY, req_id, code, str(exc).encode()])
            return
        await self._send(identity, [REPLY, req_id, b"", local.encode()])

    def _on_session_request(self, c: _Consumer, req: pb2.SessionRequest) -> None:
        if req.job:
            if self._session_job and req.job != self._session_job:
                self._refuse_lanes(c, req, "FAILED_PRECONDITION",
                                   f"this agent serves job {self._session_job!r}, not {req.job!r}")
                return
            self._session_job = req.job
        out = pb2.SessionResponse()
        for op in req.open:
            old = c.lanes.pop(op.lane, None)
            if old is not None:
                self._close_route(c, op.lane, old)
            if op.read_only:
                g = self._new_lane()
                c.lanes[op.lane] = g
                self._lanes[g] = _Lane(c.identity, op.lane, op.rank)
                opened = self._pending.open.add()
                opened.CopyFrom(op)
                opened.lane = g
            else:
                key = (int(op.rank), int(op.world_size))
                c.lanes[op.lane] = key
                slices = self._join_feed(key, (c.identity, op.lane), op)
                if slices:
                    out.lanes.add(lane=op.lane, slices=slices)
        unknown = []
        now = time.monotonic()
        for ack in req.acks:
            route = c.lanes.get(ack.lane)
            if route is None:
                unknown.append(ack.lane)
            elif isinstance(route, int):
                self._acks[route] = max(self._acks.get(route, -1), ack.next_step)
            else:
                feed = self._feeds.get(route)
                if feed is None:
                    unknown.append(ack.lane)
                    continue
                pos = feed.ack((c.identity, ack.lane), ack.next_step)
                beat = pos is None and feed.sent_position >= 0 and now - feed.sent_at > HEARTBEAT_S
                if beat:
                    pos = feed.sent_position  # a rank that only re-confirms stays live on the server
                if pos is not None and feed.lane:
                    g = feed.lane
                    group = self._feed_lanes.get(g, [feed])
                    low = min(max(f.sent_position, 0) for f in group)
                    if beat or self._ack_due(g, group, low):
                        for f in group:
                            f.sent_at = now
                        self._acks[g] = max(self._acks.get(g, -1), pos)
                        self._lane_sent[g] = low
                    if self.cache is not None:
                        # A consumer acknowledges a step when it takes it, before it reads its
                        # samples; every step of this rank before its position - 1 is read by
                        # now (each of its workers is there or later), so those needs end here,
                        # without waiting for the server's confirmation.
                        self.cache.release_lane(g, feed.sent_position - 1, feed.rank)
                # The feed holds the acknowledgement from now on (and re-sends it on reconnect).
                out.events.add(lane=ack.lane, acked_step=ack.next_step)
        for lane in sorted(set(unknown)):
            # Acknowledgements of lanes this agent never opened: the consumer's previous agent
            # is gone (this one restarted). Tell it at once, so it re-opens instead of waiting.
            out.events.add(lane=lane, error_code="UNAVAILABLE",
                           error=f"lane {lane} is unknown to this agent (agent {self.agent_id} restarted?); "
                                 "open it again")
        for lane in req.close:
            route = c.lanes.pop(lane, None)
            if route is not None:
                self._close_route(c, lane, route)
        if out.lanes or out.events:
            asyncio.create_task(self._send(c.identity, [SESSION, self.agent_id.encode(), out.SerializeToString()]))
        self._flush.set()

    def _new_lane(self) -> int:
        g = self._next_lane
        self._next_lane += 1
        return g

    def _join_feed(self, key: tuple[int, int], member: tuple[bytes, int], op: pb2.LaneOpen) -> list:
        """Adds a consumer lane to its rank's feed (opening or re-opening the feed's server lane
        when needed); returns the buffered slices it is owed now."""
        stride = max(int(op.step_stride), 1)
        first = int(op.start_step) + (int(op.step_offset) % stride - int(op.start_step)) % stride
        feed = self._feeds.get(key)
        stop = int(op.stop_step)
        if feed is None:
            feed = RankFeed(rank=key[0], world=key[1], lane=0, start=first, lookahead=int(op.lookahead), stop=stop)
            self._feeds[key] = feed
            self._queue_open(feed)
        elif feed.needs_reopen(first, stop):
            if feed.lane:
                self._dissolve(feed.lane, reopen={id(feed): (first, stop)})
            else:  # its lane has not opened yet: it opens from the earlier step
                feed.reopen(0, first, stop)
        return feed.add(member, op)

    def _queue_open(self, feed: RankFeed) -> None:
        """The feed's server lane opens with the writer's next message, grouped with the other
        ranks of the node whose lanes open then (one lane of several ranks)."""
        feed.lane = 0
        now = time.monotonic()
        if not feed.opened:
            if not any(not f.opened for f in self._feed_opens):
                self._opens_first = now
            self._opens_last = now
        self._feed_opens.append(feed)
        self._flush.set()

    def _dissolve(self, g: int, reopen: "dict[int, tuple[int, int]] | None" = None,
                  drop: RankFeed | None = None) -> None:
        """Closes server lane g; its feeds (but `drop`) open again from what their members are
        still owed (`reopen`: a feed's own (start, stop) instead)."""
        feeds = self._feed_lanes.pop(g, [])
        self._close_server_lane(g)
        for f in feeds:
            if f is drop:
                continue
            start, stop = (reopen or {}).get(id(f), (f.resume_point(), f.stop))
            f.reopen(0, start, stop)
            self._queue_open(f)

    def _take_opens(self) -> float | None:
        """Moves the queued feeds' lane opens into the pending message, grouping consecutive
        ranks of one world and stop into one lane each; returns how long to wait first instead
        (new feeds wait for the node's other ranks), or None when they were taken."""
        pending = self._feed_opens
        if not pending:
            return None
        now = time.monotonic()
        if any(not f.opened for f in pending) and now < self._opens_first + OPEN_WAIT_S:
            if self.local_ranks:
                if len(self._feeds) < self.local_ranks:
                    return self._opens_first + OPEN_WAIT_S - now
            elif now < self._opens_last + OPEN_SETTLE_S:
                return self._opens_last + OPEN_SETTLE_S - now
        self._feed_opens = []
        pending.sort(key=lambda f: (f.world, f.stop, f.rank))
        groups: list[list[RankFeed]] = []
        for f in pending:
            last = groups[-1][-1] if groups else None
            if last is not None and (last.world, last.stop, last.rank + 1) == (f.world, f.stop, f.rank):
                groups[-1].append(f)
            else:
                groups.append([f])
        for feeds in groups:
            g = self._new_lane()
            for f in feeds:
                f.lane, f.opened = g, True
            self._feed_lanes[g] = feeds
            head = feeds[0]
            self._pending.open.add(lane=g, rank=head.rank, world_size=head.world,
                                   start_step=min(f.start for f in feeds), lookahead=max(f.lookahead for f in feeds),
                                   step_stride=1, step_offset=0, stop_step=head.stop,
                                   rank_count=len(feeds) if len(feeds) > 1 else 0)
            if any(f.sent_position >= 0 for f in feeds):
                self._acks[g] = max(f.sent_position for f in feeds)
                self._lane_sent[g] = min(max(f.sent_position, 0) for f in feeds)
        return None

    def _ack_due(self, g: int, group: list[RankFeed], low: int) -> bool:
        """Whether lane g's acknowledgement goes to the server now: once its slowest rank moved
        ACK_SHARE-th of the lookahead since the last one sent (the server keeps the rest of the
        window flowing meanwhile), at the lane's stop, and for the first one."""
        last = self._lane_sent.get(g, -1)
        if last < 0:
            return True
        gap = max(1, max(f.lookahead for f in group) // ACK_SHARE)
        stop = group[0].stop
        return low - last >= gap or bool(stop and low >= stop)

    def _lane_ack(self, g: int, step: int) -> pb2.LaneAck:
        """The acknowledgement of server lane g: per rank for a lane of several ranks."""
        feeds = self._feed_lanes.get(g)
        if feeds is None or len(feeds) == 1:
            return pb2.LaneAck(lane=g, next_step=step)
        steps = [max(f.sent_position, 0) for f in feeds]
        return pb2.LaneAck(lane=g, next_step=min(steps), rank_steps=steps)

    def _close_server_lane(self, g: int) -> None:
        self._acks.pop(g, None)
        self._lane_sent.pop(g, None)
        if self._session is not None:
            self._pending.close.append(g)
        if self.cache is not None:
            self.cache.forget_lane(g)

    def _close_route(self, c: _Consumer, local: int, route: "int | tuple[int, int]") -> None:
        if isinstance(route, int):
            if self._lanes.pop(route, None) is not None:
                self._close_server_lane(route)
            return
        feed = self._feeds.get(route)
        if feed is None:
            return
        feed.remove((c.identity, local))
        if not feed.members:
            del self._feeds[route]
            if not feed.lane:
                self._feed_opens = [f for f in self._feed_opens if f is not feed]
            elif len(self._feed_lanes.get(feed.lane, ())) > 1:
                self._dissolve(feed.lane, drop=feed)  # the node's other ranks go on in a lane of their own
            else:
                self._feed_lanes.pop(feed.lane, None)
                self._close_server_lane(feed.lane)

    def _refuse_lanes(self, c: _Consumer, req: pb2.SessionRequest, code: str, message: str) -> None:
        resp = pb2.SessionResponse(events=[pb2.LaneEvent(lane=op.lane, error_code=code, error=message)
                                           for op in req.open])
        asyncio.create_task(self._send(c.identity, [SESSION, self.agent_id.encode(), resp.SerializeToString()]))

    # -- the server session ------------------------------------------------------------------------
    def _report(self) -> pb2.NodeReport:
        r = pb2.NodeReport(node=self.node, agent_id=self.agent_id, consumers=len(self._consumers))
        if self.cache is not None:
            s = self.cache.stats()
            r.bytes_downloaded = int(s["bytes_downloaded"])
            r.cache_hits = int(s["hits"])
            r.cache_misses = int(s["misses"])
            r.cache_bytes = int(s["cache_bytes"])
            r.cache_limit = int(self.cache_limit or 0)
            r.shards_downloaded = int(s["shards_downloaded"])
        return r

    async def _writer(self) -> None:
        """Sends what consumers asked for (opens, aggregated acks, closes) on the session."""
        last_report = 0.0
        while not self._stopping.is_set():
            await _wait_event(self._flush, REPORT_S)
            if self._stopping.is_set():
                return
            self._flush.clear()
            wait = self._take_opens()
            if wait is not None and self._open_timer is None:
                def due() -> None:
                    self._open_timer = None
                    self._flush.set()
                self._open_timer = asyncio.get_running_loop().call_later(wait, due)
            req = self._pending
            self._pending = pb2.SessionRequest()
            for g, step in self._acks.items():
                req.acks.append(self._lane_ack(g, step))
            self._acks.clear()
            now = time.monotonic()
            if now - last_report >= REPORT_S:
                req.node.CopyFrom(self._report())
                last_report = now
                await asyncio.to_thread(self.write_stats)
            if not (req.open or req.acks or req.close or req.HasField("node")):
                continue
            if self._session is None:
                if not req.open:
                    continue  # nothing open: acks and closes of a lost session are moot
                self._open_session()
                req.job = self._session_job
                req.node.CopyFrom(self._report())
            try:
                await self._session.write(req)
                self.stats["messages_to_server"] += 1
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
                self._lose_session(f"writing to the server failed: {exc}")

    def _open_session(self) -> None:
        stub = self._channel.stream_stream(f"/{SERVICE_NAME}/Session",
                                           request_serializer=pb2.SessionRequest.SerializeToString,
                                           response_deserializer=pb2.SessionResponse.FromString)
        self._session = stub(metadata=self._metadata)
        self.stats["sessions_opened"] += 1
        asyncio.create_task(self._reader(self._session))
        log.info("session opened", extra={"event": "agent_session_open", "server": self.server})

    async def _reader(self, call: Any) -> None:
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise ConnectionError("the server ended the session")
                self.stats["messages_from_server"] += 1
                self._dispatch(resp)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any end of the session is a loss
            if call is self._session:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                self._lose_session(detail or type(exc).__name__)

    def _dispatch(self, resp: pb2.SessionResponse) -> None:
        out: dict[bytes, pb2.SessionResponse] = {}
        needs: list[tuple[int, int, int, object]] = []  # (step, rank, lane, slice)
        for ls in resp.lanes:
            feeds = self._feed_lanes.get(ls.lane)
            if feeds is not None:
                for feed, slices in zip(feeds, _per_rank(ls.slices, len(feeds))):
                    if self.cache is not None:
                        needs.extend((int(sl.step), feed.rank, ls.lane, sl) for sl in slices)
                    for (identity, local), got in feed.on_slices(slices).items():
                        out.setdefault(identity, pb2.SessionResponse()).lanes.add(lane=local, slices=got)
                continue
            ln = self._lanes.get(ls.lane)
            if ln is None:
                continue
            m = out.setdefault(ln.consumer, pb2.SessionResponse())
            m.lanes.add(lane=ln.local, slices=ls.slices)
        if needs:
            # The node's needs in the order its ranks will read them: step by step across ranks,
            # not each rank's steps in turn (a message carries several steps of several ranks;
            # the cache ranks shards by when they are first needed).
            needs.sort(key=lambda n: (n[0], n[1]))
            for _step, rank, lane, sl in needs:
                self.cache.prefetch_slices(lane, (sl,), rank)
        for ev in resp.events:
            feeds = self._feed_lanes.get(ev.lane)
            if feeds is not None:
                if not ev.error_code:
                    if self.cache is not None and ev.acked_step:
                        for f in feeds:  # each rank got at least the lane's acknowledged step
                            self.cache.release_lane(ev.lane, min(ev.acked_step, max(f.sent_position, 0)), f.rank)
                    continue
                # The lane failed on the server: every worker of its ranks hears it.
                for feed in feeds:
                    for identity, local in list(feed.members):
                        out.setdefault(identity, pb2.SessionResponse()).events.add(
                            lane=local, error_code=ev.error_code, error=ev.error)
                        c = self._consumers.get(identity)
                        if c is not None:
                            c.lanes.pop(local, None)
                    self._feeds.pop((feed.rank, feed.world), None)
                self._feed_lanes.pop(ev.lane, None)
                if self.cache is not None:
                    self.cache.forget_lane(ev.lane)
                continue
            ln = self._lanes.get(ev.lane)
            if ln is None:
                continue
            m = out.setdefault(ln.consumer, pb2.SessionResponse())
            e = m.events.add()
            e.CopyFrom(ev)
            e.lane = ln.local
            if ev.error_code:
                c = self._consumers.get(ln.consumer)
                if c is not None:
                    c.lanes.pop(ln.local, None)
                self._lanes.pop(ev.lane, None)
        agent = self.agent_id.encode()
        for identity, m in out.items():
            asyncio.create_task(self._send(identity, [SESSION, agent, m.SerializeToString()]))

    def _lose_session(self, why: str) -> None:
        """The server session ended: every open lane is reported UNAVAILABLE to its consumer,
        which re-opens it (a new session opens with the first re-opened lane)."""
        if self._session is None:
            return
        self.stats["session_losses"] += 1
        log.warning("server session lost (%s); %d lanes told to reconnect", why,
                    len(self._lanes) + len(self._feed_lanes),
                    extra={"event": "agent_session_lost", "server": self.server})
        call, self._session = self._session, None
        call.cancel()
        self._pending = pb2.SessionRequest()
        self._acks.clear()
        self._lane_sent.clear()
        agent = self.agent_id.encode()
        by_consumer: dict[bytes, pb2.SessionResponse] = {}
        message = f"the agent lost its server session: {why}"
        for g, ln in self._lanes.items():
            by_consumer.setdefault(ln.consumer, pb2.SessionResponse()).events.add(
                lane=ln.local, error_code="UNAVAILABLE", error=message)
        self._feed_opens = []
        for feed in self._feeds.values():
            for identity, local in feed.members:
                by_consumer.setdefault(identity, pb2.SessionResponse()).events.add(
                    lane=local, error_code="UNAVAILABLE", error=message)
        if self.cache is not None:
            for g in [*self._lanes, *self._feed_lanes]:
                self.cache.forget_lane(g)
        self._lanes.clear()
        self._feeds.clear()
        self._feed_lanes.clear()
        for c in self._consumers.values():
            c.lanes.clear()
        for identity, m in by_consumer.items():
            asyncio.create_task(self._send(identity, [SESSION, agent, m.SerializeToString()]))

    async def _beats(self) -> None:
        agent = self.agent_id.encode()
        idle_since = time.monotonic()
        while not self._stopping.is_set():
            await asyncio.sleep(BEAT_S)
            now = time.monotonic()
            if self._consumers:
                idle_since = now
            elif self.idle_exit_s and now - idle_since > self.idle_exit_s:
                log.info("no consumer for %.0f s: exiting", now - idle_since, extra={"event": "agent_idle_exit"})
                self.stop()
            for identity, c in list(self._consumers.items()):
                if now - c.last_seen > CONSUMER_TIMEOUT_S:
                    log.info("consumer silent for %.0f s; its lanes are closed", now - c.last_seen,
                             extra={"event": "consumer_gone"})
                    for local, route in list(c.lanes.items()):
                        self._close_route(c, local, route)
                    del self._consumers[identity]
                    self._flush.set()
                elif c.lanes:
                    await self._send(identity, [BEAT, agent])


def _per_rank(slices, n: int) -> list[list[pb2.Slice]]:
    """A lane of n ranks' slices, split into each rank's (its ids are the ranks' one after another)."""
    if n == 1:
        return [list(slices)]
    out: list[list[pb2.Slice]] = [[] for _ in range(n)]
    for sl in slices:
        if sl.kind == pb2.SLICE_KIND_END_OF_DATA:
            for part in out:
                part.append(sl)
            continue
        ids = slice_ids(sl)
        p = len(ids) // n
        for i, part in enumerate(out):
            part.append(pb2.Slice(step=sl.step, kind=sl.kind, packed_ids=pack_ids(ids[i * p:(i + 1) * p])))
    return out


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
    try:
        socket_path(agent.runtime_dir).unlink()
    except OSError:
        pass
    os._exit(1)


__all__ = ["NodeAgent", "AgentLocked", "run_agent"]
