"""How `tests/data/state_v1/` was made: state directories written by the v1 server (commit 923a3a5).

They are test data, not fixtures: `tests/unit/test_state_v1.py` opens them with today's code and
checks that the job resumes exactly where the old server left off, and runs this scenario
again with today's code to check that it writes the same files. Do NOT regenerate them with
newer code (that would only prove the new code agrees with itself); a new on-disk format
gets a new folder (`state_v2/`) beside this one. (The v1 server read steps with the job's
blocking `get_slice`, since removed; `slice_ids` below is the same read through the job's
non-blocking calls.)

- `basic/`: synthetic clusters, clusterclip, two ranks, three online changes (one after the
  last automatic checkpoint, so it lives in the event log alone), a trainer's checkpoint
  token, and the process stopped without a shutdown checkpoint (as after a kill -9).
- `adaptive/`: the same plus an adaptive controller fed loss reports and per-sample token
  counts, so its checkpoints carry every payload section (sampler state, token tally,
  adapter); stopped with the shutdown checkpoint.

Each folder holds `delivered.json`: the world, every global batch delivered, the token and
where the ranks stood (what the test replays against).

    .venv/bin/python tests/data/make_state_v1.py tests/data/state_v1
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.feedback.adapt import AdaptSpec
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig

BASIC_SIZES = [500, 120, 30, 7]
ADAPT_SIZES = [60, 60, 60, 60]
B = 16
SEED = 7
WORLD = 2


def token_counts(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) % 7 + 3).astype(np.int64)


def losses_of(ids: np.ndarray) -> np.ndarray:
    return np.where(np.asarray(ids) // 60 == 0, 4.0, 1.0) + 0.01 * (np.asarray(ids) % 5)


def slice_ids(job: Job, rank: int, step: int) -> np.ndarray:
    """The rank's slice of `step` (always within the lag bound here: never waits)."""
    waiter = job.begin_get_slice(rank, WORLD, step)
    try:
        sl = job.try_slice(rank, WORLD, step)
    finally:
        job.end_wait(rank, waiter)
    assert sl is not None
    return sl.ids


def deal(job: Job, start: int, stop: int, delivered: dict[int, list[int]], report: bool = False) -> None:
    for t in range(start, stop):
        parts = [slice_ids(job, r, t) for r in range(WORLD)]
        delivered[t] = np.concatenate(parts).tolist()
        for r in range(WORLD):
            job.ack(r, WORLD, t + 1)
            if report:  # a rank reports the losses of a step it has trained (acknowledged)
                accepted, refused = job.report_losses(r, WORLD, [(t, losses_of(parts[r]), None)])
                assert accepted == 1 and not refused, refused


def make_basic(out: Path) -> None:
    job = Job(ClusterLayout.from_sizes(BASIC_SIZES), PolicyConfig("clusterclip", clip=4), B, SEED,
              spec=JobSpec(name="v1", max_lag=8, max_lookahead=4, checkpoint_every=10, snapshot_every=4),
              store=CheckpointStore(out))
    for r in range(WORLD):
        job.join(r, WORLD, "v1")
    delivered: dict[int, list[int]] = {}
    deal(job, 0, 14, delivered)
    job.update(job.status().generated_step + 2, clip=2)
    deal(job, 14, 25, delivered)
    job.update(job.status().generated_step + 1, weights=[1.0, 3.0, 1.0, 2.0])
    deal(job, 25, 33, delivered)
    token = job.checkpoint(29).token
    job.update(job.status().generated_step + 3, clip=3)  # after the last automatic checkpoint (30)
    deal(job, 33, 36, delivered)
    job.close()  # drains the writer; no shutdown checkpoint (a kill -9 leaves the same)
    (out / "delivered.json").write_text(json.dumps({"world": WORLD, "global_batch": B, "seed": SEED,
                                                    "sizes": BASIC_SIZES, "token": token, "token_step": 29,
                                                    "acked": 36, "delivered": delivered}) + "\n")


def make_adaptive(out: Path) -> None:
    job = Job(ClusterLayout.from_sizes(ADAPT_SIZES), PolicyConfig("clusterclip", clip=20), B, SEED,
              spec=JobSpec(name="v1a", max_lag=8, max_lookahead=4, checkpoint_every=10, snapshot_every=4),
              store=CheckpointStore(out), adapt=AdaptSpec("loss-softmax", every=5),
              token_counts=[(0, token_counts(sum(ADAPT_SIZES)))])
    for r in range(WORLD):
        job.join(r, WORLD, "v1a")
    delivered: dict[int, list[int]] = {}
    deal(job, 0, 12, delivered, report=True)
    job.update(job.status().generated_step + 1, clip=15)
    deal(job, 12, 27, delivered, report=True)
    token = job.checkpoint(24).token
    job.checkpoint_now()  # what a server stopping gracefully writes
    job.close()
    (out / "delivered.json").write_text(json.dumps({"world": WORLD, "global_batch": B, "seed": SEED,
                                                    "sizes": ADAPT_SIZES, "token": token, "token_step": 24,
                                                    "acked": 27, "delivered": delivered}) + "\n")


def main(root: str) -> None:
    for name, make in (("basic", make_basic), ("adaptive", make_adaptive)):
        out = Path(root) / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        make(out)


if __name__ == "__main__":
    main(sys.argv[1])
