"""Test helpers over a `Job`'s public, non-blocking API.

`get_slice(job, rank, world, step, timeout)` is what a GetSlice call does in the servicer
(`begin_get_slice`, `try_slice` until the lag bound lets the step through, `end_wait`), in
the caller's thread: tests read any step of the sequence with it, the job itself keeps no
blocking call of its own. `train_step` reads a step and acknowledges it, as a trainer does.
"""

from __future__ import annotations

import time

import numpy as np

from croupier.server.job.job import Job, SliceData, StepOutOfRange


def get_slice(job: Job, rank: int, world: int, step: int, timeout: float | None = None, job_name: str = "") -> SliceData:
    """Rank's slice of `step`, waiting (up to `timeout` seconds, None: for ever) while the step
    is beyond the lag bound. Read-only: the rank's position does not move."""
    waiter = job.begin_get_slice(rank, world, step, job=job_name)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            waiter.event.clear()
            out = job.try_slice(rank, world, step)
            if out is not None:
                return out
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                raise StepOutOfRange(f"step {step} stayed beyond the lag bound until the deadline")
            waiter.event.wait(wait)
    finally:
        job.end_wait(rank, waiter)


def train_step(job: Job, rank: int, world: int, step: int) -> np.ndarray:
    """What a trainer rank does with a step: reads its slice and acknowledges it, so the job
    counts the step as dealt to the rank (a loss report of it is then accepted). Returns the ids."""
    ids = get_slice(job, rank, world, step, timeout=10).ids
    job.ack(rank, world, step + 1)
    return ids
