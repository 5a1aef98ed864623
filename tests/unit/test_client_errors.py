"""The client's error mapping and its small value types, without a sampler server.

Each status code comes from a real gRPC server that aborts with it, so the `RpcError`
objects are the ones a trainer would see.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from croupier.client.errors import (
    ClientError,
    InvalidRequest,
    Mismatch,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    from_rpc_error,
    is_transient,
)
from croupier.client.rank_client import Backoff, RankClient
from croupier.client.rank_state import validate_state
from croupier.errors import ConfigError, CroupierError, StateError
from croupier.topology import Topology


@pytest.fixture(scope="module")
def aborting_channel():
    """A real server whose one method aborts with the status code named in the request."""

    def handle(request: bytes, context):
        context.abort(grpc.StatusCode[request.decode()], f"server says {request.decode().lower()}")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Fail", {"Call": grpc.unary_unary_rpc_method_handler(handle)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield channel.unary_unary("/test.Fail/Call")
    channel.close()
    server.stop(0)


@pytest.mark.parametrize("code, cls", [
    ("UNAUTHENTICATED", Unauthenticated),
    ("PERMISSION_DENIED", PermissionDenied),
    ("INVALID_ARGUMENT", InvalidRequest),
    ("FAILED_PRECONDITION", Mismatch),
    ("OUT_OF_RANGE", OutOfRange),
    ("NOT_FOUND", NotFound),
    ("UNAVAILABLE", Unavailable),
    ("DEADLINE_EXCEEDED", Unavailable),
    ("DATA_LOSS", ClientError),
    ("INTERNAL", ClientError),
])
def test_each_status_becomes_its_typed_error_with_the_server_message(aborting_channel, code, cls):
    with pytest.raises(grpc.RpcError) as info:
        aborting_channel(code.encode(), timeout=10)
    err = from_rpc_error(info.value, "Join")
    assert type(err) is cls
    assert isinstance(err, CroupierError)
    assert err.code == grpc.StatusCode[code]
    assert err.details == f"server says {code.lower()}"
    assert str(err) == f"Join failed ({code}): server says {code.lower()}"
    assert is_transient(info.value) == (code in ("UNAVAILABLE", "DEADLINE_EXCEEDED"))


def test_permission_denied_is_an_authentication_error():
    assert issubclass(PermissionDenied, Unauthenticated)


def test_backoff_grows_with_jitter_up_to_its_cap():
    b = Backoff(initial_s=0.1, max_s=1.0, give_up_after_s=5)
    for attempt, top in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (40, 1.0)]:
        delays = [b.delay(attempt) for _ in range(200)]
        assert top * 0.5 <= min(delays) and max(delays) <= top
    with pytest.raises(ConfigError, match="initial_s"):
        Backoff(initial_s=0, max_s=1)
    with pytest.raises(ConfigError, match="give_up_after_s"):
        Backoff(give_up_after_s=0)


def test_state_validation_names_the_bad_field():
    good = {"version": 1, "sampler_fingerprint": "smp:abc", "next_step": 3, "token": ""}
    validate_state(good)
    for bad, what in [
        ({**good, "version": 2}, "version"),
        ({**good, "next_step": -1}, "next_step"),
        ({**good, "next_step": "3"}, "next_step"),
        ({**good, "sampler_fingerprint": ""}, "sampler_fingerprint"),
        ({**good, "token": None}, "token"),
        ({k: v for k, v in good.items() if k != "token"}, "lacks"),
        ([1, 2], "mapping"),
    ]:
        with pytest.raises(StateError, match=what):
            validate_state(bad)


def test_client_validates_at_construction_and_opens_nothing():
    topo = Topology(0, 1)
    with pytest.raises(ConfigError, match="lookahead"):
        RankClient("127.0.0.1:1", job="j", topology=topo, lookahead=0)
    with pytest.raises(ConfigError, match="step_stride"):
        RankClient("127.0.0.1:1", job="j", topology=topo, step_stride=0)
    with pytest.raises(ConfigError, match="job"):
        RankClient("127.0.0.1:1", job="", topology=topo)
    c = RankClient("127.0.0.1:1", job="j", topology=topo)
    assert c._transport is None  # nothing opened before the first call: safe to fork
    c.close()


def test_topology_comes_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    c = RankClient("127.0.0.1:1", job="j")
    assert c.topology == Topology(3, 4, 1)
    c.close()


def test_data_parallel_topology_from_torchrun_env_and_parallel_sizes():
    # 16 ranks = pipeline 2 x data 2 x tensor 4: tensor innermost, pipeline outermost
    got = [Topology.data_parallel({"RANK": str(g), "WORLD_SIZE": "16", "LOCAL_RANK": str(g % 8)}, tensor=4,
                                  pipeline=2) for g in range(16)]
    assert {t.world for t in got} == {2}
    assert [t.rank for t in got] == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
    assert got[13].local_rank == 5
    ctx = [Topology.data_parallel({"RANK": str(g), "WORLD_SIZE": "8"}, tensor=2, context=2).rank for g in range(8)]
    assert ctx == [0, 0, 0, 0, 1, 1, 1, 1]
    assert Topology.data_parallel({"RANK": "5", "WORLD_SIZE": "8"}) == Topology(5, 8)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by tensor x context x pipeline = 4 x 1 x 1"):
        Topology.data_parallel({"RANK": "0", "WORLD_SIZE": "6"}, tensor=4)
    with pytest.raises(ConfigError, match="tensor-parallel size must be an int >= 1, got 0"):
        Topology.data_parallel({"RANK": "0", "WORLD_SIZE": "6"}, tensor=0)


def test_the_loss_sender_is_importable_by_its_former_path():
    import importlib
    import sys

    from croupier.client import loss_sender

    sys.modules.pop("croupier.client.loss_reporter", None)
    with pytest.warns(DeprecationWarning, match="croupier.client.loss_reporter moved to croupier.client.loss_sender"):
        old = importlib.import_module("croupier.client.loss_reporter")
    assert old is loss_sender and old.LossReporter is loss_sender.LossSender
