"""A real in-process sampler server per test (port 0), called over real sockets."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from croupier.cli import main
from croupier.grpc_options import MAX_MESSAGE_BYTES, bearer, channel_options
from croupier.layout import ClusterLayout
from croupier.proto import pb2, pb2_grpc, slice_ids
from croupier.server.durability.resume_token import CheckpointToken
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.serving.metrics import ServerMetrics
from croupier.server.serving.service import create_server
from jobs import start_server
from workers.harness import self_signed

SIZES = [5000, 300, 20, 1]
B = 64
CODE = grpc.StatusCode


def make_job(**spec) -> Job:
    spec = {"max_lag": 8, "max_lookahead": 4, **spec}
    return Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0,
               spec=JobSpec(name="demo", **spec))


def reference(n: int) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0)
    return [s.next_batch() for _ in range(n)]


@pytest.fixture
def served():
    """(job, stub, channel) of a fresh server; the channel closed and the server stopped after
    the test, passed or failed."""
    with ExitStack() as stack:
        job = make_job()
        _, port = start_server(stack, job)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()))
        yield job, pb2_grpc.SamplerStub(channel), channel


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            next(result)
    return info.value.code(), info.value.details()


def test_version_health_and_reflection(served) -> None:
    job, stub, channel = served
    v = stub.GetVersion(pb2.GetVersionRequest(), timeout=5)
    assert v.api_version == "croupier.v1" and v.server_version
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "croupier.v1.Sampler"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"croupier.v1.Sampler", "grpc.health.v1.Health"} <= names


def test_every_bad_input_gets_its_status_and_the_server_keeps_serving(served) -> None:
    job, stub, channel = served
    assert code_of(stub.GetSlice, pb2.GetSliceRequest(rank=0, world_size=2, step=0))[0] == CODE.FAILED_PRECONDITION
    stub.Join(pb2.JoinRequest(job="demo", rank=0, world_size=2), timeout=5)
    other_fp = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=3), B, 0).fingerprint
    cases = [
        (stub.Join, pb2.JoinRequest(rank=2, world_size=2), CODE.INVALID_ARGUMENT, "outside the world"),
        (stub.Join, pb2.JoinRequest(rank=0, world_size=4), CODE.INVALID_ARGUMENT, "job's world size 2"),
        (stub.Join, pb2.JoinRequest(rank=0, world_size=2, global_batch=32), CODE.INVALID_ARGUMENT,
         "job's global batch 64"),
        (stub.Join, pb2.JoinRequest(rank=0, world_size=3), CODE.INVALID_ARGUMENT, "not divisible by world size 3"),
        (stub.Join, pb2.JoinRequest(job="other", rank=0, world_size=2), CODE.NOT_FOUND, "'other'"),
        (stub.Join, pb2.JoinRequest(rank=0, world_size=2, resume_token=CheckpointToken(other_fp, 4).encode()),
         CODE.FAILED_PRECONDITION, other_fp),
        (stub.Join, pb2.JoinRequest(rank=0, world_size=2, resume_token="croupier-ckpt-v1:4:x:0000"),
         CODE.INVALID_ARGUMENT, "checksum"),
        (stub.GetSlice, pb2.GetSliceRequest(rank=0, world_size=2, step=-1), CODE.OUT_OF_RANGE, "negative"),
        (stub.GetSlice, pb2.GetSliceRequest(rank=0, world_size=2, step=10**9), CODE.OUT_OF_RANGE, "too far ahead"),
        (stub.GetSlice, pb2.GetSliceRequest(rank=5, world_size=2, step=0), CODE.INVALID_ARGUMENT, "outside"),
        (stub.Ack, pb2.AckRequest(rank=0, world_size=2, next_step=10**9), CODE.OUT_OF_RANGE, "ahead"),
        (stub.Checkpoint, pb2.CheckpointRequest(step=-3), CODE.OUT_OF_RANGE, "negative"),
        (stub.Checkpoint, pb2.CheckpointRequest(step=10**9), CODE.OUT_OF_RANGE, "too far ahead"),
        (stub.StreamSlices, pb2.StreamSlicesRequest(rank=0, world_size=2, step_stride=2, step_offset=5),
         CODE.INVALID_ARGUMENT, "step offset"),
        (stub.StreamSlices, pb2.StreamSlicesRequest(rank=0, world_size=2, start_step=-1), CODE.OUT_OF_RANGE,
         "negative"),
        (stub.Update, pb2.UpdateRequest(step=0, clip=2), CODE.INVALID_ARGUMENT, "already generated"),
    ]
    stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=2, step=0), timeout=5)  # generated step is now 1
    for call, request, code, fragment in cases:
        got, details = code_of(call, request, timeout=5)
        assert (got, fragment in details) == (code, True), (request, got, details)
    garbage = channel.unary_unary("/croupier.v1.Sampler/Join")
    got, details = code_of(garbage, b"\xff\xff\xff\xff\x0f", timeout=5)
    assert got == CODE.INVALID_ARGUMENT and "not a valid croupier.v1.JoinRequest" in details
    assert code_of(garbage, b"\x00" * (MAX_MESSAGE_BYTES + 1), timeout=5)[0] == CODE.RESOURCE_EXHAUSTED
    ok = stub.GetSlice(pb2.GetSliceRequest(rank=1, world_size=2, step=0), timeout=5).slice
    assert ok.kind == pb2.SLICE_KIND_DATA and slice_ids(ok).tolist() == reference(1)[0][B // 2:].tolist()


def test_good_rank_streams_while_bad_calls_are_refused(served) -> None:
    job, stub, channel = served
    ref = reference(40)
    stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=5)
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def trainer() -> None:
        try:
            for resp in stub.StreamSlices(pb2.StreamSlicesRequest(rank=0, world_size=1, stop_step=40), timeout=30):
                for s in resp.slices:
                    got[s.step] = slice_ids(s).tolist()
                    stub.Ack(pb2.AckRequest(rank=0, world_size=1, next_step=s.step + 1), timeout=5)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    t = threading.Thread(target=trainer)
    t.start()
    refused = 0
    while refused < 2 or (t.is_alive() and refused < 200):
        for req in (pb2.JoinRequest(rank=3, world_size=1), pb2.JoinRequest(rank=0, world_size=2)):
            assert code_of(stub.Join, req, timeout=5)[0] == CODE.INVALID_ARGUMENT
            refused += 1
    t.join(30)
    assert not errors, errors
    assert sorted(got) == list(range(40)) and refused > 0
    assert all(got[i] == ref[i].tolist() for i in range(40))


def test_status_counters_equal_what_the_ranks_received(served) -> None:
    job, stub, channel = served
    lay = ClusterLayout.from_sizes(SIZES)
    received = []
    for r in range(2):
        stub.Join(pb2.JoinRequest(rank=r, world_size=2), timeout=5)
    for t in range(30):
        for r in range(2):
            received.append(slice_ids(stub.GetSlice(pb2.GetSliceRequest(rank=r, world_size=2, step=t), timeout=5).slice))
            stub.Ack(pb2.AckRequest(rank=r, world_size=2, next_step=t + 1), timeout=5)
    st = stub.GetStatus(pb2.GetStatusRequest(include_clusters=True), timeout=5)
    assert st.generated_step == 30 and st.slowest_step == 30
    ids = np.concatenate([np.asarray(x) for x in received])
    counts = np.bincount(lay.clusters_of(ids), minlength=len(SIZES))
    assert list(st.cluster_draws) == counts.tolist()
    assert max(np.bincount(ids)) <= 5  # the clip
    assert [r.next_step for r in st.ranks] == [30, 30]


def test_cancelled_stream_releases_its_rank(served) -> None:
    job, stub, channel = served
    stub.Join(pb2.JoinRequest(rank=0, world_size=2), timeout=5)
    stub.Join(pb2.JoinRequest(rank=1, world_size=2), timeout=5)
    call = stub.StreamSlices(pb2.StreamSlicesRequest(rank=0, world_size=2))
    first = next(call)
    assert first.slices[0].step == 0
    assert stub.GetStatus(pb2.GetStatusRequest(), timeout=5).ranks[0].connected
    call.cancel()  # the stream is now blocked on flow control; cancelling must free it
    deadline = time.monotonic() + 10
    while stub.GetStatus(pb2.GetStatusRequest(), timeout=5).ranks[0].connected:
        assert time.monotonic() < deadline, "cancelled stream still counted as connected"
        time.sleep(0.05)
    # The rank comes back and resumes at its acknowledged step.
    assert stub.Join(pb2.JoinRequest(rank=0, world_size=2), timeout=5).next_step == 0


def test_tokens_are_required_and_update_needs_the_admin_token() -> None:
    job = make_job()
    server, port = create_server(job, "127.0.0.1:0", token="s3cret", admin_token="adm1n")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) as channel:
            stub = pb2_grpc.SamplerStub(channel)
            for metadata in ((), bearer("wrong"), (("authorization", "s3cret"),)):
                for call, req in ((stub.GetVersion, pb2.GetVersionRequest()),
                                  (stub.Join, pb2.JoinRequest(rank=0, world_size=1)),
                                  (stub.StreamSlices, pb2.StreamSlicesRequest(rank=0, world_size=1)),
                                  (stub.GetStatus, pb2.GetStatusRequest())):
                    got, details = code_of(call, req, metadata=metadata, timeout=5)
                    assert got == CODE.UNAUTHENTICATED and "bearer token" in details
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5))
            assert info.value.code() == CODE.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel)  # open for orchestrator probes
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            assert stub.Join(pb2.JoinRequest(rank=0, world_size=1), metadata=bearer("s3cret"), timeout=5).job.job
            update = pb2.UpdateRequest(step=10, clip=3)
            assert code_of(stub.Update, update, metadata=bearer("s3cret"), timeout=5)[0] == CODE.PERMISSION_DENIED
            assert stub.Update(update, metadata=bearer("adm1n"), timeout=5).effective_step == 10
    finally:
        server.stop(0, checkpoint=False)



def test_tls_with_a_self_signed_certificate(tmp_path: Path, capsys) -> None:
    cert, key = self_signed(tmp_path)
    server, port = create_server(make_job(), "127.0.0.1:0", tls_cert=cert, tls_key=key, token="t0k",
                                 admin_token="adm")
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", creds, options=channel_options()) as channel:
            stub = pb2_grpc.SamplerStub(channel)
            stub.Join(pb2.JoinRequest(rank=0, world_size=1), metadata=bearer("t0k"), timeout=10)
            ids = slice_ids(stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=1, step=0), metadata=bearer("t0k"),
                                          timeout=10).slice)
            assert list(ids) == reference(1)[0].tolist()
        (tmp_path / "tok").write_text("t0k")
        (tmp_path / "adm").write_text("adm")
        tls = ["--server", f"localhost:{port}", "--tls-ca", str(cert)]
        assert main(["status", *tls, "--token-file", str(tmp_path / "tok"), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["generated_step"] == 1
        assert main(["update", *tls, "--token-file", str(tmp_path / "adm"), "--step", "4", "--clip", "2"]) == 0
        assert json.loads(capsys.readouterr().out) == {"effective_step": 4}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plain:  # plaintext to a TLS port fails
            got, _ = code_of(pb2_grpc.SamplerStub(plain).GetVersion, pb2.GetVersionRequest(), timeout=3)
            assert got in (CODE.UNAVAILABLE, CODE.DEADLINE_EXCEEDED)
    finally:
        server.stop(0, checkpoint=False)


def test_metrics_endpoint_reports_steps_clusters_and_lag(served) -> None:
    job, stub, channel = served
    stub.Join(pb2.JoinRequest(rank=0, world_size=2), timeout=5)
    stub.Join(pb2.JoinRequest(rank=1, world_size=2), timeout=5)
    for t in range(3):
        stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=2, step=t), timeout=5)
        stub.Ack(pb2.AckRequest(rank=0, world_size=2, next_step=t + 1), timeout=5)
    metrics = ServerMetrics(job)
    metrics.refused("/croupier.v1.Sampler/Join", CODE.INVALID_ARGUMENT)
    port = metrics.serve("127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        metrics.stop()
    assert "croupier_steps_generated_total 3.0" in text
    assert "croupier_indices_served_total 96.0" in text
    assert 'croupier_cluster_draws_total{cluster="3"}' in text
    assert "croupier_clipped_clusters" in text
    assert 'croupier_rank_lag_steps{rank="1"} 3.0' in text
    assert 'croupier_refused_calls_total{code="INVALID_ARGUMENT",method="Join"} 1.0' in text
