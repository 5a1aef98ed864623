"""The node agent refuses a malformed consumer message like the server refuses a malformed
request: an INVALID_ARGUMENT answer and a counter, never an exception left in a task; and a
`CROUPIER_AGENT` that is no runtime directory is a ConfigError naming it.

The agent runs in this process (its own event loop on a thread, a server address nobody
serves: no message here needs the server); a raw DEALER socket plays the consumer."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from croupier.client.agent.consumer_frames import BadFrame, parse
from croupier.client.agent.daemon import NodeAgent
from croupier.client.agent.protocol import endpoint
from croupier.client.agent.transport import AgentTransport
from croupier.errors import ConfigError
from croupier.proto import pb2
from workers.harness import free_port, wait_for


class Running:
    """An in-process agent and a consumer socket talking to it."""

    def __init__(self, tmp: Path) -> None:
        self.agent = NodeAgent(f"127.0.0.1:{free_port()}", tmp / "run", tmp / "cache")
        self.loop = asyncio.new_event_loop()
        self.failures: list[dict] = []  # what the loop's exception handler heard
        self.loop.set_exception_handler(lambda _loop, ctx: self.failures.append(ctx))
        ready = asyncio.Event()
        self.done = threading.Event()

        def serve() -> None:
            try:
                self.loop.run_until_complete(self.agent.run(ready))
            finally:
                self.done.set()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        wait_for(lambda: ready.is_set(), 30, "the agent to serve")
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 10_000)
        self.sock.connect(endpoint(tmp / "run"))

    def ask(self, *frames: bytes) -> list[bytes]:
        """Sends one message; returns the agent's answer (its first message back)."""
        self.sock.send_multipart(list(frames))
        return self.sock.recv_multipart()

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()
        self.loop.call_soon_threadsafe(self.agent.stop)
        assert self.done.wait(30), "the agent did not stop"
        self.thread.join(30)
        self.loop.close()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = Running(tmp_path)
    try:
        yield r
    finally:
        r.close()


def _session(**kw) -> bytes:
    return pb2.SessionRequest(job="j", **kw).SerializeToString()


MALFORMED = [
    # (frames, the request id answered, words of the refusal)
    ([b"fetch", b"7", b"\x00" * 7], b"7", "(a multiple of 8 bytes), got 7 bytes"),
    ([b"fetch", b"8", b"\x01" * 20], b"8", "(a multiple of 8 bytes), got 20 bytes"),
    ([b"fetch", b"9"], b"9", "a FETCH message has 3 to 4 frames, got 2"),
    ([b"fetch", b"10", b"\x00" * 8, b"abc"], b"10", "a FETCH's source is a decimal index in [0, 65536], got b'abc'"),
    ([b"fetch", b"11", b"\x00" * 8, b"-1"], b"11", "got b'-1'"),
    ([b"fetch", b"12", np.array([3, -2], "<i8").tobytes()], b"12", "shard ids must be >= 0, got -2"),
    ([b"fetch", b"13", b"", b"1", b"extra"], b"13", "a FETCH message has 3 to 4 frames, got 5"),
    ([b"call", b"14", b"\xff\xfe", b""], b"14", "a CALL's method name must be ASCII"),
    ([b"call", b"15"], b"15", "a CALL message has 4 frames, got 2"),
    ([b"call", b"16", b"Shutdown", b""], b"16", "not 'Shutdown'"),
    ([b"call", b"17", b"G" * 65, b""], b"17", "at most 64 bytes, got 65"),
    ([b"session", b"\xff\xff\xff"], b"", "a SESSION message must carry a SessionRequest; 3 bytes do not parse"),
    ([b"session"], b"", "a SESSION message has 2 frames, got 1"),
    ([b"session", b"", b""], b"", "a SESSION message has 2 frames, got 3"),
    ([b"bogus", b"18"], b"18", "unknown consumer message kind b'bogus'"),
    ([b""], b"", "unknown consumer message kind b''"),
    ([b"hello"], b"", "a HELLO message has 2 frames, got 1"),
]


def test_every_malformed_frame_is_answered_invalid_argument_and_counted(running: Running, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="croupier.client.agent.daemon")
    for frames, req_id, words in MALFORMED:
        answer = running.ask(*frames)
        assert answer[:3] == [b"reply", req_id, b"INVALID_ARGUMENT"], (frames, answer)
        assert words in answer[3].decode(), (frames, answer[3])
    # Lane opens and acknowledgements out of bounds are refused on their lane, as the server would.
    bad_lanes = [
        (pb2.LaneOpen(lane=3, rank=0, world_size=0), "world size must be >= 1, got 0"),
        (pb2.LaneOpen(lane=4, rank=2, world_size=2), "rank 2 is outside [0, world size 2)"),
        (pb2.LaneOpen(lane=5, rank=0, world_size=1, start_step=-4), "start step must be >= 0, got -4"),
        (pb2.LaneOpen(lane=6, rank=0, world_size=1, step_stride=2, step_offset=2),
         "step offset 2 is outside [0, step stride 2)"),
        (pb2.LaneOpen(lane=7, rank=1, world_size=2, rank_count=2), "rank count 2 must be >= 0 and its ranks lie"),
    ]
    for op, words in bad_lanes:
        kind, _agent, body = running.ask(b"session", _session(open=[op]))
        events = pb2.SessionResponse.FromString(body).events
        assert kind == b"session" and [(e.lane, e.error_code) for e in events] == [(op.lane, "INVALID_ARGUMENT")]
        assert words in events[0].error
    kind, _agent, body = running.ask(b"session", _session(acks=[pb2.LaneAck(lane=9, next_step=-3)]))
    events = pb2.SessionResponse.FromString(body).events
    assert [(e.lane, e.error_code) for e in events] == [(9, "INVALID_ARGUMENT")]
    assert "an acknowledged step must be >= 0, got -3" in events[0].error

    # The agent goes on serving: a well-formed HELLO is answered as before.
    hello = running.ask(b"hello", b"99")
    assert hello[0] == b"hello" and hello[1] == b"99" and hello[2] == running.agent.agent_id.encode()
    refused = len(MALFORMED) + len(bad_lanes) + 1
    assert running.agent.stats_now()["bad_messages"] == refused
    assert running.failures == []  # no task ended in an exception nobody retrieved
    assert not [r for r in caplog.records if r.exc_info]  # one line each, no traceback
    warned = [r for r in caplog.records if getattr(r, "event", "") == "bad_consumer_message"]
    assert len(warned) == 10  # the first ten are logged one by one, then every hundredth


def test_a_well_formed_fetch_without_a_job_is_answered_not_raised(running: Running) -> None:
    """A FETCH before any rank joined (no dataset known) is answered with the cache's refusal."""
    answer = running.ask(b"fetch", b"1", np.array([0, 1], "<i8").tobytes())
    assert answer[:2] == [b"reply", b"1"] and answer[2] in (b"FAILED_PRECONDITION", b"DATA_LOSS")
    answer = running.ask(b"fetch", b"2", np.array([0], "<i8").tobytes(), b"1")
    assert answer == [b"reply", b"2", b"FAILED_PRECONDITION",
                      b"a fetch names source 1, but this agent's job is not a mixture"]
    assert running.failures == []
    assert running.agent.stats_now()["bad_messages"] == 0


def test_parse_takes_the_well_formed_messages() -> None:
    fetch = parse([b"fetch", b"1", np.array([5, 6], "<i8").tobytes(), b"2"])
    assert fetch.req_id == b"1" and fetch.shards.tolist() == [5, 6] and fetch.source == 2
    call = parse([b"call", b"2", b"GetStatus", b"\x08\x01"])
    assert (call.method, call.payload) == ("GetStatus", b"\x08\x01")
    with pytest.raises(BadFrame, match="an empty consumer message"):
        parse([])


def test_croupier_agent_naming_a_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    regular = tmp_path / "not-a-dir"
    regular.write_text("x")
    with pytest.raises(ConfigError, match=f"CROUPIER_AGENT='{regular}' is not a directory"):
        AgentTransport(regular)
    with pytest.raises(ConfigError, match=f"no croupier agent socket at '{tmp_path / 'nowhere' / 'agent.sock'}'"):
        AgentTransport(tmp_path / "nowhere")


def test_an_agent_runtime_dir_that_is_a_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    regular = tmp_path / "run"
    regular.write_text("x")
    agent = NodeAgent(f"127.0.0.1:{free_port()}", regular, tmp_path / "cache")
    with pytest.raises(ConfigError, match=f"cannot create the agent runtime directory '{regular}'"):
        asyncio.run(agent.run())


def test_auto_agent_under_a_file_is_a_config_error_naming_it(tmp_path: Path, monkeypatch) -> None:
    from croupier.client.agent.auto import RUNTIME_ENV, ensure_agent

    regular = tmp_path / "rt"
    regular.write_text("x")
    monkeypatch.setenv(RUNTIME_ENV, str(regular))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match=f"cannot create the agent's runtime directory '{regular}/"):
        ensure_agent("127.0.0.1:1", "job")
