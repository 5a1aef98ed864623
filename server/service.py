"""The gRPC face of a `Job`: a thin servicer, and `create_server` that wires it up.

The servicer translates protos to domain calls and domain errors to status codes, nothing
more (the job holds the one lock). Requests are parsed here rather than by gRPC, so a
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
    UNAUTHENTICATED      missing or wrong bearer token (auth interceptor)
    PERMISSION_DENIED    Update without the admin token (auth interceptor)
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from pathlib import Path
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from croupier import __version__
from croupier.errors import ConfigError, CroupierError, DatasetError, FingerprintMismatch, StateError
from croupier.proto import API_VERSION, SERVICE_NAME, pb2
from croupier.server.auth import TokenAuthInterceptor
from croupier.server.grpc_options import server_options
from croupier.server.job import Job, JobReformed, JobStatus, NotJoined, SliceData, StepOutOfRange, UnknownJob

log = logging.getLogger("croupier.server.service")

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
    return grpc.StatusCode.INTERNAL


def job_info(job: Job) -> pb2.JobInfo:
    spec = job.spec
    return pb2.JobInfo(
        job=spec.name, dataset_remote=spec.dataset_remote, dataset_fingerprint=spec.dataset_fingerprint,
        sampler_fingerprint=job.fingerprint, global_batch=job.global_batch, policy=job.config.policy,
        policy_json=job.config.canonical_json(), seed=job.seed, num_samples=job.layout.num_samples,
        num_clusters=job.layout.num_clusters, selection=spec.selection, world_size=job.world or 0)


def _slice_pb(s: SliceData) -> pb2.Slice:
    if s.end:
        return pb2.Slice(step=s.step, kind=_END)
    return pb2.Slice(step=s.step, ids=s.ids.tolist(), kind=_DATA)


def status_response(job: Job, st: JobStatus, include_clusters: bool) -> pb2.GetStatusResponse:
    resp = pb2.GetStatusResponse(
        job=job_info(job), generated_step=st.generated_step, durable_step=st.durable_step,
        slowest_step=st.slowest_step, fastest_step=st.fastest_step, active_clusters=st.active_clusters,
        clip=st.clip,
        ranks=[pb2.RankStatus(rank=r.rank, next_step=r.next_step, delivered_step=r.delivered_step,
                              seconds_since_seen=r.seconds_since_seen, connected=r.connected) for r in st.ranks])
    if include_clusters:
        resp.cluster_sizes.extend(st.sizes.tolist())
        resp.cluster_draws.extend(st.draws.tolist())
        resp.cluster_passes.extend(st.passes.tolist())
        resp.cluster_clipped_at.extend(st.clipped_at.tolist())
    return resp


class SamplerServicer:
    """croupier.v1.Sampler over a `Job`. Methods take parsed requests and a grpc context."""

    def __init__(self, job: Job, on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self.job = job
        self._on_refused = on_refused

    def GetVersion(self, request: pb2.GetVersionRequest, context) -> pb2.GetVersionResponse:
        return pb2.GetVersionResponse(server_version=__version__, api_version=API_VERSION)

    def Join(self, request: pb2.JoinRequest, context) -> pb2.JoinResponse:
        r = self.job.join(rank=request.rank, world=request.world_size, job=request.job,
                          global_batch=request.global_batch, resume_token=request.resume_token,
                          client_version=request.client_version)
        return pb2.JoinResponse(job=job_info(self.job), next_step=r.next_step, per_rank_batch=r.per_rank_batch,
                                max_lookahead=self.job.spec.max_lookahead, max_lag=self.job.spec.max_lag)

    def StreamSlices(self, request: pb2.StreamSlicesRequest, context):
        stream = self.job.open_stream(
            rank=request.rank, world=request.world_size, start_step=request.start_step,
            lookahead=request.lookahead, step_stride=request.step_stride, step_offset=request.step_offset,
            stop_step=request.stop_step, job=request.job)
        context.add_callback(stream.cancel)
        try:
            for chunk in stream:
                yield pb2.StreamSlicesResponse(slices=[_slice_pb(s) for s in chunk])
        finally:
            stream.close()

    def GetSlice(self, request: pb2.GetSliceRequest, context) -> pb2.GetSliceResponse:
        s = self.job.get_slice(rank=request.rank, world=request.world_size, step=request.step, job=request.job,
                               is_active=context.is_active, timeout=context.time_remaining())
        return pb2.GetSliceResponse(slice=_slice_pb(s))

    def Ack(self, request: pb2.AckRequest, context) -> pb2.AckResponse:
        slowest, fastest = self.job.ack(rank=request.rank, world=request.world_size, next_step=request.next_step,
                                        job=request.job)
        return pb2.AckResponse(slowest_step=slowest, fastest_step=fastest)

    def Checkpoint(self, request: pb2.CheckpointRequest, context) -> pb2.CheckpointResponse:
        c = self.job.checkpoint(step=request.step, job=request.job)
        return pb2.CheckpointResponse(token=c.token, step=c.step, path=c.path)

    def GetStatus(self, request: pb2.GetStatusRequest, context) -> pb2.GetStatusResponse:
        return status_response(self.job, self.job.status(), request.include_clusters)

    def Update(self, request: pb2.UpdateRequest, context) -> pb2.UpdateResponse:
        if request.clip < 0:
            raise ConfigError(f"clip must be >= 1 (0 = unchanged), got {request.clip}")
        step = self.job.update(step=request.step, clip=int(request.clip), weights=list(request.weights))
        return pb2.UpdateResponse(effective_step=step)

    # -- wiring -------------------------------------------------------------------------------------
    def _refuse(self, context, method: str, exc: CroupierError) -> None:
        code = status_code_of(exc)
        log.info("call refused", extra={"event": "refused", "method": method, "code": code.name,
                                        "reason": str(exc)})
        if self._on_refused is not None:
            self._on_refused(method, code)
        context.abort(code, str(exc))

    def _parse(self, cls: type, raw: bytes, context, method: str):
        try:
            return cls.FromString(raw)
        except DecodeError as exc:
            self._refuse(context, method, ConfigError(f"request is not a valid {cls.DESCRIPTOR.full_name}: {exc}"))

    def _unary(self, name: str, req_cls: type, resp_cls: type) -> grpc.RpcMethodHandler:
        fn = getattr(self, name)

        def handle(raw: bytes, context):
            request = self._parse(req_cls, raw, context, name)
            try:
                return fn(request, context)
            except CroupierError as exc:
                self._refuse(context, name, exc)

        return grpc.unary_unary_rpc_method_handler(handle, response_serializer=resp_cls.SerializeToString)

    def _unary_stream(self, name: str, req_cls: type, resp_cls: type) -> grpc.RpcMethodHandler:
        fn = getattr(self, name)

        def handle(raw: bytes, context):
            request = self._parse(req_cls, raw, context, name)
            try:
                yield from fn(request, context)
            except CroupierError as exc:
                self._refuse(context, name, exc)

        return grpc.unary_stream_rpc_method_handler(handle, response_serializer=resp_cls.SerializeToString)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """All Sampler methods, taking raw request bytes (parsed in `_parse`)."""
        handlers = {}
        for method in pb2.DESCRIPTOR.services_by_name["Sampler"].methods:
            req_cls = getattr(pb2, method.input_type.name)
            resp_cls = getattr(pb2, method.output_type.name)
            make = self._unary_stream if method.server_streaming else self._unary
            handlers[method.name] = make(method.name, req_cls, resp_cls)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class SamplerServer:
    """A running sampler server: gRPC server, health, reflection, the job. Stop with `stop()`."""

    def __init__(self, grpc_server: grpc.Server, job: Job, health_servicer: health.HealthServicer,
                 port: int, host: str, tls: bool) -> None:
        self.grpc_server = grpc_server
        self.job = job
        self.health = health_servicer
        self.port = port
        self.host = host
        self.tls = tls
        self._stopped = threading.Event()

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def start(self) -> "SamplerServer":
        self.grpc_server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = 2.0, checkpoint: bool = True) -> None:
        """Reports NOT_SERVING, stops accepting calls, ends streams after `grace` seconds,
        then (by default) durably checkpoints the generator's state. Idempotent."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        if checkpoint and self.job.store is not None:
            step = self.job.checkpoint_now(kind="auto")
            log.info("stopped", extra={"event": "stopped", "checkpoint_step": step})

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def _split_host(address: str) -> str:
    host = address.rsplit(":", 1)[0]
    return host.strip("[]")


def create_server(job: Job, address: str = "127.0.0.1:0", *, token: str | None = None,
                  admin_token: str | None = None, tls_cert: str | Path | None = None,
                  tls_key: str | Path | None = None, max_workers: int = 2048,
                  on_refused: Callable[[str, grpc.StatusCode], None] | None = None,
                  start: bool = True) -> tuple[SamplerServer, int]:
    """A sampler server for `job` bound to `address` (port 0 picks a free port).

    Returns (server, bound port), started unless `start` is False. Every open stream holds
    one worker thread, so `max_workers` bounds concurrent streams plus unary calls.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
    if max_workers < 4:
        raise ConfigError(f"max workers must be >= 4, got {max_workers}")
    interceptors = []
    auth = TokenAuthInterceptor(token, admin_token, on_refused=on_refused)
    if auth.enabled:
        interceptors.append(auth)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="croupier-rpc"),
                         interceptors=interceptors, options=server_options())
    servicer = SamplerServicer(job, on_refused=on_refused)
    server.add_generic_rpc_handlers((servicer.generic_handler(),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    tls = tls_cert is not None
    try:
        if tls:
            try:
                key, cert = Path(tls_key).read_bytes(), Path(tls_cert).read_bytes()  # type: ignore[arg-type]
            except OSError as exc:
                raise ConfigError(f"cannot read TLS certificate or key: {exc}") from None
            port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot bind {address}: {exc}") from None
    if not port:
        raise ConfigError(f"cannot bind {address}")
    srv = SamplerServer(server, job, health_servicer, port, _split_host(address), tls)
    if start:
        srv.start()
    return srv, port


def describe(server: SamplerServer) -> dict[str, Any]:
    """The facts a launcher prints and writes to server.json."""
    job = server.job
    return {"address": server.address, "port": server.port, "tls": server.tls, "job": job.spec.name,
            "sampler_fingerprint": job.fingerprint, "dataset_fingerprint": job.spec.dataset_fingerprint,
            "global_batch": job.global_batch, "policy": job.config.policy, "num_clusters": job.layout.num_clusters,
            "resumed_from": job.resumed_from, "version": __version__}
