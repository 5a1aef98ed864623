"""Online changes of a job dealt in tokens: a change of token step s reaches the document
sampler at its first draw made while dealing step s or later, the same way on every replay;
states taken before or after the change resume the one sequence, through a served job too
(an Update, a restart from the state directory)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from croupier.errors import ConfigError
from croupier.layout import ClusterLayout
from croupier.proto import pb2, slice_ids
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import Change
from croupier.server.sampling.token_stream import TokenDealer, TokenSchedule

SIZES = [400, 120, 30, 8]
COUNTS = np.random.default_rng(5).integers(0, 90, sum(SIZES))
CONFIG = PolicyConfig("weighted", weights=(1.0, 1.0, 1.0, 1.0), clip=4, on_exhausted="random")
CHUNK = 7
CHANGES = [Change(step=10, weights=(0.0, 1.0, 1.0, 1.0)), Change(step=25, clip=6)]


def dealer() -> TokenDealer:
    layout = ClusterLayout.from_sizes(SIZES)
    return TokenDealer(lambda: Sampler(layout, CONFIG, CHUNK, 2), [(0, COUNTS)], TokenSchedule.parse("0:256"), CHUNK)


def run(d: TokenDealer, n: int) -> list[tuple[list[int], list[tuple[int, int]]]]:
    out = []
    for _ in range(n):
        sl = d.next_step().part(0, 1)
        out.append((sl.ids.tolist(), sl.ranges()))
    return out


def whole(n: int = 40) -> list:
    d = dealer()
    for c in CHANGES:
        d.schedule_change(c)
    return run(d, n)


def test_a_change_reaches_the_document_draws_after_its_step() -> None:
    steps = whole()
    assert steps != run(dealer(), 40)
    assert steps[:10] == run(dealer(), 10)  # nothing before the change's step moves
    cluster0 = set(range(SIZES[0]))
    # documents drawn before step 10 may still be dealt in it; from the next draw on, none of cluster 0
    later = [doc for ids, _ in steps[13:] for doc in ids]
    assert later and not cluster0 & set(later)
    assert cluster0 & {doc for ids, _ in steps[:10] for doc in ids}


@pytest.mark.parametrize("at", [4, 10, 11, 24, 30])
def test_a_state_resumes_the_one_sequence_before_or_after_the_changes(at: int) -> None:
    want = whole()
    d = dealer()
    for c in CHANGES:
        d.schedule_change(c)
    run(d, at)
    resumed = dealer()
    resumed.load_state(d.state())
    assert run(resumed, 40 - at) == want[at:]
    # a state saved before the changes were made, the changes scheduled on it afterwards (what a
    # replay from an older snapshot or checkpoint does)
    if at <= CHANGES[0].step:
        early = dealer()
        run(early, at)
        again = dealer()
        again.load_state(early.state())
        for c in CHANGES:
            again.schedule_change(c)
        assert run(again, 40 - at) == want[at:]


def test_bad_changes_are_refused_by_name() -> None:
    d = dealer()
    run(d, 5)
    with pytest.raises(ConfigError, match="online change at step 3: the token stream has dealt up to step 4"):
        d.schedule_change(Change(step=3, clip=5))
    with pytest.raises(ConfigError):
        d.schedule_change(Change(step=8, weights=(1.0, 2.0)))  # the document sampler's own check
    assert run(d, 5) == run(dealer(), 10)[5:]  # refused changes leave the stream as it was


def token_job(store: CheckpointStore) -> Job:
    layout = ClusterLayout.from_sizes(SIZES)
    return Job(layout, CONFIG, CHUNK, 2, spec=JobSpec(name="t", checkpoint_every=8), store=store,
               tokens=(TokenSchedule.parse("0:256"), [(0, COUNTS)], CHUNK))


def read(stub, start: int, stop: int) -> list[list[int]]:
    out = []
    for t in range(start, stop):
        out.append(slice_ids(stub.GetSlice(pb2.GetSliceRequest(rank=0, world_size=1, step=t), timeout=10).slice)
                   .tolist())
        stub.Ack(pb2.AckRequest(rank=0, world_size=1, next_step=t + 1), timeout=10)
    return out


def test_a_served_token_job_takes_updates_and_a_restart_replays_them(tmp_path: Path) -> None:
    import grpc

    from croupier.grpc_options import channel_options
    from croupier.proto import pb2_grpc
    from jobs import start_server

    want = [ids for ids, _ in whole()]
    got: list[list[int]] = []
    with ExitStack() as stack:
        _, port = start_server(stack, token_job(CheckpointStore(tmp_path / "state")), checkpoint=True)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()))
        stub = pb2_grpc.SamplerStub(channel)
        stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=10)
        got += read(stub, 0, 3)
        for c in CHANGES:
            req = pb2.UpdateRequest(step=c.step, clip=c.clip or 0, weights=list(c.weights or ()))
            assert stub.Update(req, timeout=10).effective_step == c.step
        got += read(stub, 3, 18)
    with ExitStack() as stack:  # the server stopped (final checkpoint at 18): a new one on the same state
        job = token_job(CheckpointStore(tmp_path / "state"))
        assert job.resumed_from == 18
        _, port = start_server(stack, job)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()))
        stub = pb2_grpc.SamplerStub(channel)
        stub.Join(pb2.JoinRequest(rank=0, world_size=1), timeout=10)
        got += read(stub, 18, 40)
    assert got == want
    # `croupier simulate --global-tokens ... --state-dir`: the flags' dealer with the job's changes
    import argparse

    from croupier.errors import FingerprintMismatch
    from croupier.server.cli.simulate_cli import _token_job_changes

    d = dealer()
    generated = _token_job_changes(argparse.Namespace(state_dir=str(tmp_path / "state")), d)
    assert generated >= 40
    assert [ids for ids, _ in run(d, 40)] == want
    other = TokenDealer(lambda: Sampler(ClusterLayout.from_sizes(SIZES), CONFIG, CHUNK, 3), [(0, COUNTS)],
                        TokenSchedule.parse("0:256"), CHUNK)
    with pytest.raises(FingerprintMismatch):
        _token_job_changes(argparse.Namespace(state_dir=str(tmp_path / "state")), other)


def test_a_change_of_g_takes_effect_at_its_step_and_replays_from_any_state() -> None:
    from croupier.server.durability.change_log import change_to_event, event_to_change

    g = Change(step=12, global_tokens=768)
    assert event_to_change(change_to_event(g)).global_tokens == 768  # the event log carries it
    want = dealer()
    want.schedule_change(g)
    steps = [want.next_step() for _ in range(30)]
    assert [s.tokens for s in steps] == [256] * 12 + [768] * 18
    assert str(want.schedule) == "0:256,12:768" and want.fingerprint == dealer().fingerprint
    for at in (5, 12, 20):
        d = dealer()
        d.schedule_change(g)
        run(d, at)
        again = dealer()
        again.load_state(d.state())
        assert [(st.ids.tolist(), st.tokens) for st in (again.next_step() for _ in range(30 - at))] == \
            [(st.ids.tolist(), st.tokens) for st in steps[at:]]
    with pytest.raises(ConfigError, match="changes only that"):
        change_to_event(Change(step=3, clip=2, global_tokens=512))


def test_update_of_global_tokens_on_a_served_token_job(tmp_path: Path) -> None:
    import grpc

    from croupier.client.cli.admin_cli import format_status
    from croupier.grpc_options import channel_options
    from croupier.proto import pb2_grpc
    from jobs import start_server

    want = dealer()
    want.schedule_change(Change(step=6, global_tokens=1024))
    want_ids = [want.next_step().part(r, 4).ids.tolist() for _ in range(12) for r in (0,)]
    with ExitStack() as stack:
        job = token_job(CheckpointStore(tmp_path / "state"))
        _, port = start_server(stack, job, checkpoint=True)
        channel = stack.enter_context(grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options()))
        stub = pb2_grpc.SamplerStub(channel)
        for r in range(4):
            stub.Join(pb2.JoinRequest(rank=r, world_size=4), timeout=10)
        with pytest.raises(grpc.RpcError, match="divisible|split|multiple"):
            stub.Update(pb2.UpdateRequest(step=6, global_tokens=1026), timeout=10)
        assert stub.Update(pb2.UpdateRequest(step=6, global_tokens=1024), timeout=10).effective_step == 6
        got, spans = [], []
        for t in range(12):
            sls = [stub.GetSlice(pb2.GetSliceRequest(rank=r, world_size=4, step=t), timeout=10).slice for r in range(4)]
            got.append(slice_ids(sls[0]).tolist())
            spans.append(sum(int(b - a) for sl in sls
                             for a, b, _ in np.frombuffer(sl.packed_token_spans, "<i8").reshape(-1, 3)))
            for r in range(4):
                stub.Ack(pb2.AckRequest(rank=r, world_size=4, next_step=t + 1), timeout=10)
        resp = stub.GetStatus(pb2.GetStatusRequest(), timeout=10)
    assert got == want_ids
    assert spans == [256] * 6 + [1024] * 6
    assert resp.job.token_schedule == "0:256,6:1024"
    assert "token schedule 0:256,6:1024" in format_status(resp)
