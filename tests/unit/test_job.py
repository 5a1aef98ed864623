"""The server's job logic without gRPC: sequence, window, replay, flow control, checkpoints."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from croupier.errors import ConfigError, FingerprintMismatch
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.durability.resume_token import ResumeToken
from croupier.server.job.job import (
    CheckpointUnavailable,
    Job,
    JobReformed,
    JobSpec,
    NotJoined,
    StepOutOfRange,
    UnknownJob,
)
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from jobs import get_slice

SIZES = [5000, 300, 20, 1]
B = 64


def layout() -> ClusterLayout:
    return ClusterLayout.from_sizes(SIZES)


def config(clip: int = 5) -> PolicyConfig:
    return PolicyConfig(policy="clusterclip", clip=clip)


def reference(n: int, clip: int = 5, changes: tuple = ()) -> list[np.ndarray]:
    s = Sampler(layout(), config(clip), B, seed=0)
    for step, kw in changes:
        s.schedule(step, **kw)
    return [s.next_batch() for _ in range(n)]


def make_job(store: CheckpointStore | None = None, **spec) -> Job:
    spec = {"max_lag": 8, "max_lookahead": 4, "snapshot_every": 8, "checkpoint_every": 20, **spec}
    return Job(layout(), config(), B, seed=0, spec=JobSpec(**spec), store=store)


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Jobs a test opens on a state directory (a checkpoint writer thread, the event log),
    closed when the test ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


def drain(job: Job, world: int, steps: int) -> dict[int, list[np.ndarray]]:
    """Every rank streams and acks `steps` steps, interleaved, as lock-step trainers would."""
    streams = {r: job.open_stream(r, world, 0) for r in range(world)}
    got: dict[int, list[np.ndarray]] = {r: [] for r in range(world)}
    for step in range(steps):
        for r, s in streams.items():
            while len(got[r]) <= step:
                got[r] += [sl.ids for sl in s.next_chunk(poll=0.05)]
            job.ack(r, world, step + 1)
    for s in streams.values():
        s.close()
    return got


def test_streams_deal_exact_slices_of_the_one_sequence() -> None:
    ref = reference(60)
    job = make_job()
    for r in range(4):
        assert job.join(r, 4).next_step == 0
    got = drain(job, 4, 60)
    for t in range(60):
        assert np.array_equal(np.concatenate([got[r][t] for r in range(4)]), ref[t])
    st = job.status()
    assert st.slowest_step == st.fastest_step == 60
    assert st.ids_served == 60 * B


def test_re_request_is_identical_inside_and_beyond_the_window() -> None:
    ref = reference(80)
    job = make_job()
    job.join(0, 1)
    drain(job, 1, 70)
    for step in (69, 65, 3, 17, 0):  # 3, 17, 0: trimmed from the window, recomputed by replay
        assert np.array_equal(get_slice(job, 0, 1, step).ids, ref[step])
    assert job.status().steps_replayed > 0
    assert np.array_equal(get_slice(job, 0, 1, 3).ids, ref[3])


def test_fast_rank_waits_within_the_lag_bound_and_is_released() -> None:
    job = make_job(max_lag=3, max_lookahead=2)
    job.join(0, 2)
    job.join(1, 2)
    for t in range(3):
        get_slice(job, 0, 2, t)
        job.ack(0, 2, t + 1)
    with pytest.raises(StepOutOfRange, match="lag bound"):
        get_slice(job, 0, 2, 3, timeout=0)  # slowest is 0, max lag 3
    stream = job.open_stream(0, 2, 3)
    assert stream.poll() == [], "rank 0 got a step beyond the lag bound"
    assert stream.waiter.lagged and not stream.waiter.event.is_set()  # a next_chunk would block
    job.ack(1, 2, 1)  # the slowest rank moves: the lag bound releases step 3
    assert stream.waiter.event.is_set(), "the waiting stream was not woken"
    chunk = stream.next_chunk(poll=5)
    assert chunk and chunk[0].step == 3
    stream.close()


def test_cancel_releases_a_waiting_stream() -> None:
    job = make_job(max_lag=1, max_lookahead=1)
    job.join(0, 2)
    job.join(1, 2)
    stream = job.open_stream(0, 2, 1)
    result: list = []
    t = threading.Thread(target=lambda: result.append(stream.next_chunk(poll=30)))
    t.start()
    time.sleep(0.2)
    stream.cancel()
    t.join(5)
    assert not t.is_alive() and result == [None]
    stream.close()
    assert not job.status().ranks[0].connected


def test_disconnected_rank_resumes_at_its_acked_step_and_others_continue() -> None:
    job = make_job()
    job.join(0, 2)
    job.join(1, 2)
    for t in range(5):
        for r in (0, 1):
            get_slice(job, r, 2, t)
            job.ack(r, 2, t + 1)
    for t in range(5, 9):  # rank 1 is gone; rank 0 goes on, up to the lag bound
        get_slice(job, 0, 2, t)
        job.ack(0, 2, t + 1)
    assert job.join(1, 2).next_step == 5
    assert job.join(0, 2).next_step == 9


def test_checkpoint_between_saved_states_resumes_exactly_with_another_world(tmp_path, closing) -> None:
    ref = reference(90)
    store = CheckpointStore(tmp_path)
    job = closing.enter_context(make_job(store))
    job.join(0, 2)
    job.join(1, 2)
    drain(job, 2, 50)
    result = job.checkpoint(37)  # between the automatic checkpoints of steps 20 and 40
    assert result.step == 37 and ResumeToken.decode(result.token).step == 37
    assert (tmp_path / "ckpt-000000000037.bin").exists()
    job.close()  # drains the background checkpoint writer, as a stopping server does
    # A new server on the same state dir; the trainer re-forms with 4 ranks at step 37.
    job2 = closing.enter_context(make_job(CheckpointStore(tmp_path)))
    assert job2.resumed_from == 40
    for r in range(4):
        assert job2.join(r, 4, resume_token=result.token).next_step == 37
    for t in range(37, 60):
        ids = [get_slice(job2, r, 4, t).ids for r in range(4)]
        assert np.array_equal(np.concatenate(ids), ref[t])
        for r in range(4):
            job2.ack(r, 4, t + 1)


def test_online_change_is_replayed_exactly(tmp_path, closing) -> None:
    job = closing.enter_context(make_job(CheckpointStore(tmp_path)))
    job.join(0, 1)
    drain(job, 1, 10)
    gen = job.status().generated_step
    job.update(gen + 2, clip=2)
    ref = reference(60, changes=((gen + 2, {"clip": 2}),))
    more = drain_from(job, 10, 50)
    for t, ids in more.items():
        assert np.array_equal(ids, ref[t])
    for t in (1, 9, gen + 1, gen + 3, 30):  # replays cross the change
        assert np.array_equal(get_slice(job, 0, 1, t).ids, ref[t])
    token = job.checkpoint(gen + 1).token
    with pytest.raises(ConfigError, match="already generated"):
        job.update(1, clip=3)
    job.close()
    job2 = closing.enter_context(make_job(CheckpointStore(tmp_path)))
    job2.join(0, 1, resume_token=token)
    for t in range(gen + 1, gen + 12):
        assert np.array_equal(get_slice(job2, 0, 1, t).ids, ref[t])
        job2.ack(0, 1, t + 1)


def drain_from(job: Job, start: int, stop: int) -> dict[int, np.ndarray]:
    out = {}
    for t in range(start, stop):
        out[t] = get_slice(job, 0, 1, t).ids
        job.ack(0, 1, t + 1)
    return out


def test_end_of_data_is_a_marker_not_an_error() -> None:
    lay = ClusterLayout.from_sizes([40, 10])
    job = Job(lay, PolicyConfig(policy="clusterclip", clip=1), 16, spec=JobSpec(max_lag=50, max_lookahead=50))
    job.join(0, 1)
    stream = job.open_stream(0, 1, 0)
    slices = [s for chunk in stream for s in chunk]
    stream.close()
    assert slices[-1].end and len(slices[-1].ids) == 0
    assert all(not s.end and len(s.ids) == 16 for s in slices[:-1])
    assert get_slice(job, 0, 1, slices[-1].step + 3).end


def test_bad_requests_name_the_rule() -> None:
    job = make_job()
    with pytest.raises(NotJoined):
        get_slice(job, 0, 1, 0)
    job.join(0, 2)
    with pytest.raises(ConfigError, match="outside the world"):
        job.join(2, 2)
    with pytest.raises(ConfigError, match="does not match the job's world size 2"):
        job.join(0, 4)
    with pytest.raises(ConfigError, match="does not match the job's global batch 64"):
        job.join(0, 2, global_batch=128)
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        job.join(0, 3)
    with pytest.raises(StepOutOfRange, match="negative"):
        get_slice(job, 0, 2, -1)
    with pytest.raises(StepOutOfRange, match="too far ahead"):
        get_slice(job, 0, 2, 10_000)
    with pytest.raises(StepOutOfRange):
        job.checkpoint(10_000)
    with pytest.raises(StepOutOfRange):
        job.ack(0, 2, 10_000)
    with pytest.raises(UnknownJob):
        job.join(0, 2, job="other")
    other = Sampler(layout(), config(clip=7), B, seed=0).fingerprint
    with pytest.raises(FingerprintMismatch, match=other):
        job.join(0, 2, resume_token=ResumeToken(other, 5).encode())
    good = job.checkpoint(3).token
    with pytest.raises(ConfigError, match="checksum"):
        job.join(0, 2, resume_token=good[:-1] + ("0" if good[-1] != "0" else "1"))
    with pytest.raises(ConfigError, match="not a croupier checkpoint token"):
        job.join(0, 2, resume_token="hello")
    with pytest.raises(ConfigError, match="step offset"):
        job.open_stream(0, 2, 0, step_stride=2, step_offset=2)
    # The job still serves after all of that.
    assert len(get_slice(job, 0, 2, 0).ids) == B // 2


def test_reform_aborts_open_streams() -> None:
    job = make_job()
    job.join(0, 2)
    stream = job.open_stream(0, 2, 0)
    assert stream.next_chunk()
    token = job.checkpoint(0).token
    job.join(0, 1, resume_token=token)
    with pytest.raises(JobReformed):
        stream.next_chunk()
    stream.close()


def test_strided_streams_split_a_rank_between_workers() -> None:
    ref = reference(12)
    job = make_job(max_lag=20, max_lookahead=20)
    job.join(0, 1)
    seen = {}
    for w in range(3):
        s = job.open_stream(0, 1, 0, step_stride=3, step_offset=w, stop_step=12)
        for chunk in s:
            for sl in chunk:
                assert sl.step % 3 == w
                seen[sl.step] = sl.ids
        s.close()
    assert sorted(seen) == list(range(12))
    assert all(np.array_equal(seen[t], ref[t]) for t in range(12))


class _Trainer:
    """A two-rank trainer driving a Job: one step per `advance`, as the round-trip check wants."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.step = 0
        for r in range(2):
            self.job.join(r, 2)

    def advance(self) -> np.ndarray:
        ids = np.concatenate([get_slice(self.job, r, 2, self.step).ids for r in range(2)])
        self.step += 1
        for r in range(2):
            self.job.ack(r, 2, self.step)
        return ids

    def load(self, token: str) -> None:
        self.step = ResumeToken.decode(token).step
        for r in range(2):
            assert self.job.join(r, 2, resume_token=token).next_step == self.step


def test_round_trip_through_a_checkpoint_token(tmp_path, closing) -> None:
    from roundtrip import assert_resume_exact

    trainers: list[_Trainer] = []

    def make() -> _Trainer:
        for t in trainers:  # the first server stops before the second opens its state directory
            t.job.close()
        trainers.append(_Trainer(closing.enter_context(make_job(CheckpointStore(tmp_path)))))
        return trainers[-1]

    tail = assert_resume_exact(make=make, advance=_Trainer.advance,
                               save=lambda t: t.job.checkpoint(t.step).token, load=_Trainer.load, k=27, tail=30)
    ref = reference(57)
    assert all(np.array_equal(a, b) for a, b in zip(tail, ref[27:]))


_REF = reference(80)


@settings(max_examples=25, deadline=None)
@given(world=st.sampled_from([1, 2, 4]), turns=st.lists(st.integers(0, 3), min_size=1, max_size=70))
def test_any_interleaving_gets_exact_slices_within_the_lag_bound(world: int, turns: list[int]) -> None:
    job = make_job(max_lag=3, max_lookahead=2)
    for r in range(world):
        job.join(r, world)
    nxt = [0] * world
    p = B // world
    for turn in turns:
        r = turn % world
        t = nxt[r]
        if t < min(nxt) + 3:
            assert np.array_equal(get_slice(job, r, world, t).ids, _REF[t][r * p:(r + 1) * p])
            nxt[r] += 1
            assert job.ack(r, world, nxt[r]) == (min(nxt), max(nxt))
        else:
            with pytest.raises(StepOutOfRange, match="lag bound"):
                get_slice(job, r, world, t, timeout=0)


def _open_files(name: str) -> list[str]:
    """This process's descriptors open on files called `name`."""
    fds = Path("/proc/self/fd")
    out = []
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if Path(target).name == name:
            out.append(target)
    return out


def test_a_job_that_cannot_start_leaves_no_file_open(tmp_path, monkeypatch) -> None:
    """The disk refuses the event log's header: the start fails with the disk's error, and the
    log's descriptor is closed with it (nothing waits for the garbage collector)."""
    from croupier.server.durability.event_log import EventLog

    def full(self, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(EventLog, "_write_synced", full)
        with pytest.raises(OSError, match="No space left") as failed:
            make_job(CheckpointStore(tmp_path))
        assert not _open_files("events.log"), failed.traceback  # the traceback still holds the log
    with make_job(CheckpointStore(tmp_path)) as job:  # the disk is back: the job starts
        job.update(3, clip=2)
        assert _open_files("events.log")
    assert not _open_files("events.log")
    with pytest.raises(CheckpointUnavailable, match="closed"):
        job.update(5, clip=3)
