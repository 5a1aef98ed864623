"""The gRPC face of a `Job`: a thin servicer, and `create_server` that wires it up.

The servicer (grpc.aio) translates protos to domain calls and domain errors to status codes,
nothing more (the job holds the one lock). Requests are parsed here rather than by gRPC, so a
message that is not a valid protobuf gets INVALID_ARGUMENT with a reason instead of gRPC's
generic INTERNAL; a message over the size limit gets RESOURCE_EXHAUSTED from gRPC itself.

Status codes (the client maps them back to croupier errors):

    INVALID_ARGUMENT     ConfigError: rank outside the world, world or batch mismatch with the
                         job, batch not divisible by the world, malformed token or message
    FAILED_PRECONDITION  FingerprintMismatch (token of another dataset/config), no rank joined yet
    OUT_OF_RANGE         negative step, step too far ahead of the slowest rank, past end of data
    NOT_FOUND            a job name this server does not serve
    ABORTED              the job was re-formed (resume token, new world) under an open stream
    DATA_LOSS            a checkpoint needed to recompute an old step is corrupt
    UNAVAILABLE          Checkpoint or Update while the state directory refuses writes (retry later)
    RESOURCE_EXHAUSTED   a peer over its limit of open streams or calls in flight (the message names it)
    UNAUTHENTICATED      missing or wrong bearer token (auth interceptor)
    PERMISSION_DENIED    Update without the admin token (auth interceptor)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from croupier import __version__
from croupier.errors import ConfigError, CroupierError, DatasetError, FingerprintMismatch, StateError
from croupier.grpc_options import server_options
from croupier.proto import API_VERSION, SERVICE_NAME, pack_ids, pb2
from croupier.server.job.job import (
    CheckpointUnavailable,
    Job,
    JobReformed,
    JobStatus,
    NotJoined,
    SliceData,
    StepOutOfRange,
    UnknownJob,
)
from croupier.server.serving.auth import AsyncTokenAuthInterceptor
from croupier.server.serving.peer_limits import DEFAULT_CALLS_PER_PEER, DEFAULT_STREAMS_PER_PEER, PeerLimits
from croupier.server.serving.session import SessionHandler, SessionState
from croupier.server.serving.wakeup import CoarseTimers, Wakeup

log = logging.getLogger(__name__)

CHECKPOINT_HEALTH = "croupier.v1.Sampler/checkpoint"
"""Health service name that turns NOT_SERVING while checkpoint writes fail (serving goes on)."""
WAKE_POLL_S = 5.0
"""A waiting stream re-checks flow control at least this often (liveness changes with time)."""
TICK_S = 1.0
"""How often the server re-derives rank liveness and checkpoint health."""

_DATA = pb2.SLICE_KIND_DATA
_END = pb2.SLICE_KIND_END_OF_DATA


def status_code_of(exc: CroupierError) -> grpc.StatusCode:
    """The gRPC status a domain error is reported with (see the module docstring)."""
    if isinstance(exc, UnknownJob):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, StepOutOfRange):
        return grpc.StatusCode.OUT_OF_RANGE
    if isinstance(exc, JobReformed):
        return grpc.StatusCode.ABORTED
    if isinstance(exc, (NotJoined, FingerprintMismatch, DatasetError)):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, ConfigError):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, StateError):
        return grpc.StatusCode.DATA_LOSS
    if isinstance(exc, CheckpointUnavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def job_info(job: Job) -> pb2.JobInfo:
    spec = job.spec
    info = pb2.JobInfo(
        job=spec.name, dataset_remote=spec.dataset_remote, dataset_fingerprint=spec.dataset_fingerprint,
        sampler_fingerprint=job.fingerprint, global_batch=job.global_batch, policy=job.policy_name,
        policy_json=job.policy_json, seed=job.seed, num_samples=job.layout.num_samples,
        num_clusters=job.layout.num_clusters, selection=spec.selection, world_size=job.world or 0,
        token_schedule="" if job.token_schedule is None else str(job.token_schedule))
    if job.mixture is not None:
        counters = job.source_counters()
        for i, src in enumerate(job.mixture.infos):
            msg = info.sources.add(name=src.name, remote=src.remote, fingerprint=src.fingerprint, offset=src.offset,
                                   size=src.size, selection=src.selection, num_clusters=src.num_clusters,
                                   weight=src.weight, policy=src.policy, exhausted_at=-1)
            if counters is not None:
                msg.weight = float(counters.weights[i])
                msg.clip = int(counters.clips[i])
                msg.draws = int(counters.draws[i])
                msg.exhausted_at = int(counters.exhausted_at[i])
                msg.active_clusters = int(counters.active_clusters[i])
                if counters.tokens_dealt is not None and counters.tokens_target is not None:
                    msg.tokens_dealt = int(counters.tokens_dealt[i])
                    msg.tokens_target = int(counters.tokens_target[i])
    return info


def _slice_pb(s: SliceData, packed: bool = True) -> pb2.Slice:
    """A slice for the wire: ids packed into bytes, or as repeated int64 for older clients."""
    if s.end:
        return pb2.Slice(step=s.step, kind=_END)
    spans = b"" if s.spans is None else np.ascontiguousarray(s.spans, dtype="<i8").tobytes()
    if packed:
        return pb2.Slice(step=s.step, packed_ids=pack_ids(s.ids), kind=_DATA, packed_token_spans=spans)
    return pb2.Slice(step=s.step, ids=s.ids.tolist(), kind=_DATA, packed_token_spans=spans)


def status_response(job: Job, st: JobStatus, include_clusters: bool) -> pb2.GetStatusResponse:
    resp = pb2.GetStatusResponse(
        job=job_info(job), generated_step=st.generated_step, durable_step=st.durable_step,
        slowest_step=st.slowest_step, fastest_step=st.fastest_step, active_clusters=st.active_clusters,
        clip=st.clip,
        ranks=[pb2.RankStatus(rank=r.rank, next_step=r.next_step, delivered_step=r.delivered_step,
                              seconds_since_seen=r.seconds_since_seen, connected=r.connected, live=r.live)
               for r in st.ranks])
    if st.checkpoint is not None:
        resp.checkpoint_error = st.checkpoint.error
        resp.checkpoint_failures = st.checkpoint.failures
        resp.generated_mark = max(st.checkpoint.mark, 0)
    resp.event_log_records, resp.event_log_failures, resp.event_log_start = st.log_records, st.log_failures, \
        st.log_start
    for step, origin, kind, ratio in st.changes:
        resp.adapt.changes.add(step=step, origin=origin, kind=kind, max_ratio=ratio)
    if st.adapt is not None:
        a = st.adapt
        resp.adapt.controller = a.spec.controller
        resp.adapt.adapt_every = a.spec.every
        resp.adapt.groups = a.spec.groups
        resp.adapt.params_json = json.dumps(a.spec.describe(), sort_keys=True)
        resp.adapt.reports_accepted = a.accepted
        resp.adapt.reports_refused = a.refused
        resp.adapt.samples_reported = a.samples
        if a.source_loss is not None and a.source_samples is not None:
            resp.adapt.source_loss.extend(a.source_loss.tolist())
            resp.adapt.source_samples.extend(a.source_samples.tolist())
        if include_clusters:
            resp.adapt.group_loss.extend(a.group_loss.tolist())
            resp.adapt.group_samples.extend(a.group_samples.tolist())
            resp.adapt.group_weight.extend(a.group_weight.tolist())
    if st.tokens is not None:
        resp.tokens_counted = True
        resp.tokens_drawn = int(st.tokens.sum())
        resp.tokens_since_step = st.tokens_since
        if include_clusters:
            resp.cluster_tokens.extend(st.tokens.tolist())
    if include_clusters:
        resp.cluster_sizes.extend(st.sizes.tolist())
        resp.cluster_draws.extend(st.draws.tolist())
        resp.cluster_passes.extend(st.passes.tolist())
        resp.cluster_clipped_at.extend(st.clipped_at.tolist())
    return resp


class SamplerServicer:
    """croupier.v1.Sampler over a `Job`, on grpc.aio: an open stream is a coroutine, not a thread.

    Quick job calls (Join, Ack, status, slices) run on the event loop; calls that write to
    disk (Checkpoint, Update) run in a small thread pool, so the loop never waits on a disk.
    """

    def __init__(self, job: Job, on_refused: Callable[[str, grpc.StatusCode], None] | None = None,
                 limits: PeerLimits | None = None) -> None:
        self.job = job
        self._on_refused = on_refused
        self.limits = limits or PeerLimits(DEFAULT_STREAMS_PER_PEER, DEFAULT_CALLS_PER_PEER)
        self.sessions: dict[int, SessionState] = {}
        self.timers = CoarseTimers()  # long waits of the streams, swept by the server's ticker

    async def GetVersion(self, request: pb2.GetVersionRequest, context) -> pb2.GetVersionResponse:
        return pb2.GetVersionResponse(server_version=__version__, api_version=API_VERSION)

    async def Join(self, request: pb2.JoinRequest, context) -> pb2.JoinResponse:
        r = self.job.join(rank=request.rank, world=request.world_size, job=request.job,
                          global_batch=request.global_batch, resume_token=request.resume_token,
                          client_version=request.client_version, sampler_state=request.sampler_state)
        return pb2.JoinResponse(job=job_info(self.job), next_step=r.next_step, per_rank_batch=r.per_rank_batch,
                                max_lookahead=self.job.spec.max_lookahead, max_lag=self.job.spec.max_lag)

    async def StreamSlices(self, request: pb2.StreamSlicesRequest, context):
        stream = self.job.open_stream(
            rank=request.rank, world=request.world_size, start_step=request.start_step,
            lookahead=request.lookahead, step_stride=request.step_stride, step_offset=request.step_offset,
            stop_step=request.stop_step, job=request.job, read_only=request.read_only)
        woken = Wakeup(asyncio.get_running_loop(), self.timers)
        stream.waiter.on_wake = woken
        try:
            while True:
                woken.arm()
                chunk = stream.poll()
                if chunk is None:
                    return
                if chunk:
                    yield pb2.StreamSlicesResponse(slices=[_slice_pb(s, request.packed_ids) for s in chunk])
                    continue
                await woken.wait(WAKE_POLL_S)
        finally:
            stream.waiter.on_wake = None
            stream.close()

    async def Session(self, requests, context):
        """Many lanes on one stream (see croupier.server.serving.session)."""
        state = SessionState(peer=context.peer())
        woken = Wakeup(asyncio.get_running_loop(), self.timers)
        handler = SessionHandler(self.job, state, woken, _slice_pb, status_code_of)
        reader = asyncio.get_running_loop().create_task(handler.read(requests))
        self.sessions[id(state)] = state
        log.info("session opened", extra={"event": "session_open", "peer": state.peer})
        try:
            while True:
                woken.arm()
                resp = handler.collect()
                if resp is not None:
                    yield resp
                    continue
                if reader.done():
                    exc = reader.exception()
                    if exc is not None:
                        raise exc
                    if not handler.streaming():
                        last = handler.collect(flush=True)
                        if last is not None:
                            yield last
                        return
                await woken.wait(handler.wait_s(WAKE_POLL_S))
        finally:
            reader.cancel()
            self.sessions.pop(id(state), None)
            handler.close()
            log.info("session closed", extra={"event": "session_close", "peer": state.peer,
                                              "node": state.node.node if state.node is not None else ""})

    async def GetSlice(self, request: pb2.GetSliceRequest, context) -> pb2.GetSliceResponse:
        job = self.job
        waiter = job.begin_get_slice(rank=request.rank, world=request.world_size, step=request.step,
                                     job=request.job)
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        deadline = None if remaining is None else loop.time() + remaining
        # a call with a deadline answers at it, not up to a sweep later: its waits keep precise timers
        woken = Wakeup(loop, self.timers if deadline is None else None)
        waiter.on_wake = woken
        try:
            while True:
                woken.arm()
                s = job.try_slice(request.rank, request.world_size, request.step)
                if s is not None:
                    return pb2.GetSliceResponse(slice=_slice_pb(s, request.packed_ids))
                wait = WAKE_POLL_S if deadline is None else min(WAKE_POLL_S, deadline - loop.time())
                if wait <= 0:
                    raise StepOutOfRange(f"step {request.step} stayed beyond the lag bound until the deadline")
                await woken.wait(wait)
        finally:
            waiter.on_wake = None
            job.end_wait(request.rank, waiter)

    async def Ack(self, request: pb2.AckRequest, context) -> pb2.AckResponse:
        slowest, fastest = self.job.ack(rank=request.rank, world=request.world_size, next_step=request.next_step,
                                        job=request.job, step_stride=request.step_stride,
                                        step_offset=request.step_offset)
        return pb2.AckResponse(slowest_step=slowest, fastest_step=fastest)

    async def Checkpoint(self, request: pb2.CheckpointRequest, context) -> pb2.CheckpointResponse:
        c = await asyncio.to_thread(self.job.checkpoint, step=request.step, job=request.job,
                                    include_state=request.include_sampler_state)
        # the path stays in the server's log
        return pb2.CheckpointResponse(token=c.token, step=c.step, sampler_state=c.sampler_state)

    async def GetStatus(self, request: pb2.GetStatusRequest, context) -> pb2.GetStatusResponse:
        resp = status_response(self.job, self.job.status(), request.include_clusters)
        resp.sessions.extend(s.status() for s in self.sessions.values())
        resp.open_streams = self.limits.open_streams()
        return resp

    async def Update(self, request: pb2.UpdateRequest, context) -> pb2.UpdateResponse:
        if request.clip < 0:
            raise ConfigError(f"clip must be >= 1 (0 = unchanged), got {request.clip}")
        if request.global_tokens < 0:
            raise ConfigError(f"global tokens must be >= 1 (0 = unchanged), got {request.global_tokens}")
        sw = request.source_weight if request.HasField("source_weight") else None
        step = await asyncio.to_thread(self.job.update, step=request.step, clip=int(request.clip),
                                       weights=list(request.weights), source=request.source, source_weight=sw,
                                       source_weights=list(request.source_weights),
                                       global_tokens=int(request.global_tokens))
        return pb2.UpdateResponse(effective_step=step)

    async def ReportLoss(self, request: pb2.ReportLossRequest, context) -> pb2.ReportLossResponse:
        steps = []
        for st in request.steps:
            present = np.asarray(st.present, dtype=bool) if len(st.present) else None
            steps.append((int(st.step), np.asarray(st.losses, dtype=np.float64), present))
        accepted, refused = self.job.report_losses(request.rank, request.world_size, steps, job=request.job)
        return pb2.ReportLossResponse(accepted=accepted, refused=[pb2.LossRefusal(step=s, rule=r, message=m)
                                                                  for s, r, m in refused])

    # -- wiring -------------------------------------------------------------------------------------
    async def _refuse(self, context, method: str, code: grpc.StatusCode, reason: str) -> None:
        log.info("call refused", extra={"event": "refused", "method": method, "code": code.name,
                                        "reason": reason})
        if self._on_refused is not None:
            self._on_refused(method, code)
        await context.abort(code, reason)

    async def _parse(self, cls: type, raw: bytes, context, method: str):
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            await self._refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT,
                               f"request is not a valid {cls.DESCRIPTOR.full_name}: {exc}")

    def _unary(self, name: str, req_cls: type, resp_cls: type) -> grpc.RpcMethodHandler:
        fn = getattr(self, name)

        async def handle(raw: bytes, context):
            peer = context.peer()
            refusal = self.limits.acquire(peer, streaming=False)
            if refusal is not None:
                await self._refuse(context, name, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            try:
                request = await self._parse(req_cls, raw, context, name)
                try:
                    return await fn(request, context)
                except CroupierError as exc:
                    await self._refuse(context, name, status_code_of(exc), str(exc))
            finally:
                self.limits.release(peer, streaming=False)

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=resp_cls.SerializeToString)

    def _unary_stream(self, name: str, req_cls: type, resp_cls: type) -> grpc.RpcMethodHandler:
        fn = getattr(self, name)

        async def handle(raw: bytes, context):
            peer = context.peer()
            refusal = self.limits.acquire(peer, streaming=True)
            if refusal is not None:
                await self._refuse(context, name, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            try:
                request = await self._parse(req_cls, raw, context, name)
                try:
                    async for item in fn(request, context):
                        yield item
                except CroupierError as exc:
                    await self._refuse(context, name, status_code_of(exc), str(exc))
            finally:
                self.limits.release(peer, streaming=True)

        return grpc.unary_stream_rpc_method_handler(handle, response_serializer=resp_cls.SerializeToString)

    def _stream_stream(self, name: str, req_cls: type, resp_cls: type) -> grpc.RpcMethodHandler:
        fn = getattr(self, name)

        async def handle(raw_requests, context):
            peer = context.peer()
            refusal = self.limits.acquire(peer, streaming=True)
            if refusal is not None:
                await self._refuse(context, name, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)

            async def parsed():
                async for raw in raw_requests:
                    try:
                        yield req_cls.FromString(raw)
                    except DecodeError as exc:
                        raise ConfigError(f"request is not a valid {req_cls.DESCRIPTOR.full_name}: {exc}") from None

            try:
                try:
                    async for item in fn(parsed(), context):
                        yield item
                except CroupierError as exc:
                    await self._refuse(context, name, status_code_of(exc), str(exc))
            finally:
                self.limits.release(peer, streaming=True)

        return grpc.stream_stream_rpc_method_handler(handle, response_serializer=resp_cls.SerializeToString)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """All Sampler methods, taking raw request bytes (parsed in `_parse`)."""
        handlers = {}
        for method in pb2.DESCRIPTOR.services_by_name["Sampler"].methods:
            req_cls = getattr(pb2, method.input_type.name)
            resp_cls = getattr(pb2, method.output_type.name)
            if method.client_streaming:
                make = self._stream_stream
            else:
                make = self._unary_stream if method.server_streaming else self._unary
            handlers[method.name] = make(method.name, req_cls, resp_cls)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class SamplerServer:
    """A running sampler server: an asyncio gRPC server (health, reflection, the job) on its own
    event-loop thread. Stop with `stop()`."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, thread: threading.Thread,
                 grpc_server: grpc.aio.Server, health_servicer: Any, servicer: SamplerServicer,
                 port: int, host: str, tls: bool) -> None:
        self.job = job
        self.loop = loop
        self._thread = thread
        self.grpc_server = grpc_server
        self.health = health_servicer
        self.servicer = servicer
        self.port = port
        self.host = host
        self.tls = tls
        self._stopped = threading.Event()
        self._ticker: asyncio.Task | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> SamplerServer:
        async def go() -> None:
            await self.grpc_server.start()
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
            await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            await self.health.set(CHECKPOINT_HEALTH, health_pb2.HealthCheckResponse.SERVING)
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

        self._run(go())
        return self

    async def _tick(self) -> None:
        """Liveness of ranks, health of checkpoint writes and the streams' long waits, once a second."""
        serving = True
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.servicer.timers.fire(loop.time())
                self.job.tick()
                h = self.job.checkpoint_health()
                ok = h is None or h.ok
                if ok != serving:
                    serving = ok
                    await self.health.set(CHECKPOINT_HEALTH, health_pb2.HealthCheckResponse.SERVING if ok
                                          else health_pb2.HealthCheckResponse.NOT_SERVING)
            except Exception:  # noqa: BLE001 - the ticker must outlive any one failure
                log.exception("tick failed", extra={"event": "tick_failed"})

    def threads(self) -> int:
        """Threads of this process now (for status and tests)."""
        return threading.active_count()

    def stop(self, grace: float | None = 2.0, checkpoint: bool = True) -> None:
        """Reports NOT_SERVING, stops accepting calls, ends streams after `grace` seconds,
        then (by default) durably checkpoints the generator's state. Idempotent. Raises
        CheckpointUnavailable when that final checkpoint cannot be written (after stopping)."""
        if self._stopped.is_set():
            return
        self._stopped.set()

        async def down() -> None:
            if self._ticker is not None:
                self._ticker.cancel()
            await self.health.enter_graceful_shutdown()
            await self.grpc_server.stop(grace)

        try:
            self._run(down())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10.0)
        try:
            if checkpoint and self.job.store is not None:
                step = self.job.checkpoint_now(kind="auto")
                log.info("stopped", extra={"event": "stopped", "checkpoint_step": step})
        finally:
            self.job.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """True once the server has been stopped (within `timeout`)."""
        return self._stopped.wait(timeout)


def _split_host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host.strip("[]")


def create_server(job: Job, address: str = "127.0.0.1:0", *, token: str | None = None,
                  admin_token: str | None = None, tls_cert: str | Path | None = None,
                  tls_key: str | Path | None = None, max_workers: int = 4,
                  streams_per_peer: int = DEFAULT_STREAMS_PER_PEER, calls_per_peer: int = DEFAULT_CALLS_PER_PEER,
                  on_refused: Callable[[str, grpc.StatusCode], None] | None = None,
                  interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                  start: bool = True) -> tuple[SamplerServer, int]:
    """A sampler server for `job` bound to `address` (port 0 picks a free port).

    Returns (server, bound port), started unless `start` is False. The server runs on one
    asyncio event loop in its own thread: an open stream costs no thread. `max_workers`
    bounds the threads that run disk-writing calls (Checkpoint, Update); `streams_per_peer`
    and `calls_per_peer` bound what one connection may hold open (RESOURCE_EXHAUSTED past it).
    `interceptors` run after authentication (e.g. a fault injector in tests).
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    if max_workers < 1:
        raise ConfigError(f"max workers must be >= 1, got {max_workers}")
    creds = None
    if tls_cert is not None:
        try:
            key, cert = Path(tls_key).read_bytes(), Path(tls_cert).read_bytes()  # type: ignore[arg-type]
        except OSError as exc:
            raise ConfigError(f"cannot read TLS certificate or key: {exc}") from None
        creds = grpc.ssl_server_credentials([(key, cert)])
    limits = PeerLimits(streams_per_peer, calls_per_peer)
    loop = asyncio.new_event_loop()
    loop.set_default_executor(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                         thread_name_prefix="croupier-io"))
    ready = threading.Event()

    def run_loop() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    thread = threading.Thread(target=run_loop, name="croupier-aio", daemon=True)
    thread.start()
    ready.wait()

    async def build() -> tuple[grpc.aio.Server, Any, SamplerServicer, int]:
        chain: list[grpc.aio.ServerInterceptor] = []
        auth = AsyncTokenAuthInterceptor(token, admin_token, on_refused=on_refused)
        if auth.enabled:
            chain.append(auth)
        chain.extend(interceptors)
        server = grpc.aio.server(interceptors=chain, options=server_options())
        servicer = SamplerServicer(job, on_refused=on_refused, limits=limits)
        server.add_generic_rpc_handlers((servicer.generic_handler(),))
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server)
        try:
            port = server.add_secure_port(address, creds) if creds is not None else server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot bind {address}: {exc}") from None
        if not port:
            raise ConfigError(f"cannot bind {address}")
        return server, health_servicer, servicer, port

    try:
        server, health_servicer, servicer, port = asyncio.run_coroutine_threadsafe(build(), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5.0)
        raise
    srv = SamplerServer(job, loop, thread, server, health_servicer, servicer, port, _split_host(address),
                        creds is not None)
    if start:
        srv.start()
    return srv, port


def describe(server: SamplerServer) -> dict[str, Any]:
    """The facts a launcher prints and writes to server.json."""
    job = server.job
    return {"address": server.address, "port": server.port, "tls": server.tls, "job": job.spec.name,
            "sampler_fingerprint": job.fingerprint, "dataset_fingerprint": job.spec.dataset_fingerprint,
            "global_batch": job.global_batch, "policy": job.policy_name, "num_clusters": job.layout.num_clusters,
            "resumed_from": job.resumed_from, "version": __version__,
            "token_schedule": "" if job.tokens is None else str(job.tokens[0])}
