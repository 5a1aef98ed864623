"""Read-only readers (`croupier client dump`, replays) never wait on ranks: any step, delivered or
beyond what the ranks reached, is served without moving a rank; beyond the ranks' lag bound it
comes from the reader's own sampler (the shared generator and window stay where the ranks are),
in bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from jobs import train_step

SIZES = [3000, 800, 200, 50, 10]
CONFIG = PolicyConfig(policy="clusterclip", clip=3, on_exhausted="random")


def expected(steps: int, changes: dict[int, int] | None = None) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), CONFIG, 16, 3)
    for step, clip in (changes or {}).items():
        s.schedule(step, clip=clip)
    return [s.next_batch() for _ in range(steps)]


def read_only(job: Job, start: int, stop: int, world: int = 1) -> list[np.ndarray]:
    stream = job.open_stream(rank=0, world=world, start_step=start, stop_step=stop, read_only=True)
    out: list[np.ndarray] = []
    try:
        while True:
            chunk = stream.poll()
            if chunk is None:
                return out
            assert chunk, f"a read-only stream waited at step {stream.next}"
            out.extend(s.ids.copy() for s in chunk)
    finally:
        stream.close()


def test_a_dump_with_no_trainer_reads_past_the_lag_bound_without_moving_anything() -> None:
    job = Job(ClusterLayout.from_sizes(SIZES), CONFIG, 16, 3, spec=JobSpec(max_lag=8, max_lookahead=4))
    try:
        job.join(0, 1)
        job.update(150, clip=4)
        got = read_only(job, 0, 300)
        assert len(got) == 300
        assert all(np.array_equal(a, b) for a, b in zip(got, expected(300, {150: 4})))
        # the shared generator went no further than the ranks' lag bound (8); the rest came from the reader's own sampler
        assert job._seq.gen.step <= 8 and max(job._seq.batches, default=0) < 8
        far = read_only(job, 2000, 2002)  # far beyond the bound the ranks set: served, from the reader's own sampler
        assert all(np.array_equal(a, b) for a, b in zip(far, expected(2002, {150: 4})[2000:])) and len(far) == 2
    finally:
        job.close()


def test_a_replay_after_a_restart_does_not_wait_for_the_old_ranks(tmp_path: Path) -> None:
    state = tmp_path / "state"
    spec = JobSpec(max_lag=16, max_lookahead=4, checkpoint_every=50)
    job = Job(ClusterLayout.from_sizes(SIZES), CONFIG, 16, 3, spec=spec, store=CheckpointStore(state))
    try:
        job.join(0, 2)
        job.join(1, 2)
        for step in range(120):
            train_step(job, 0, 2, step)
            train_step(job, 1, 2, step)
    finally:
        job.close()
    again = Job(ClusterLayout.from_sizes(SIZES), CONFIG, 16, 3, spec=spec, store=CheckpointStore(state))
    try:
        got = read_only(again, 0, 300, world=2)  # the old ranks are gone; the replay never waits for them
        want = expected(300)
        assert len(got) == 300
        assert all(np.array_equal(a, b[:8]) for a, b in zip(got, want))  # rank 0 of world 2
    finally:
        again.close()
