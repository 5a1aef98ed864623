"""Test helpers over a `Job`'s public, non-blocking API.

`get_slice(job, rank, world, step, timeout)` is what a GetSlice call does in the servicer
(`begin_get_slice`, `try_slice` until the lag bound lets the step through, `end_wait`), in
the caller's thread: tests read any step of the sequence with it, the job itself keeps no
blocking call of its own. `train_step` reads a step and acknowledges it, as a trainer does.
`batch(job, step)` is the global batch of a step (every rank's slice, none acknowledged).

`start_server(stack, job)` starts a gRPC server of a job whose stop (and the job's close) the
caller's `ExitStack` owns: a test's fixture ends both whether the test passed or failed.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import numpy as np

from croupier.server.job.job import Job, SliceData, StepOutOfRange

if TYPE_CHECKING:
    from croupier.server.serving.service import SamplerServer


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


def batch(job: Job, step: int) -> np.ndarray:
    """The global batch of `step` (empty at or past the end of data) through the public API:
    every rank's slice, read without acknowledging it, so only steps within the lag bound of
    the slowest rank can be read (StepOutOfRange at once otherwise). A job no rank has joined
    yet is joined by rank 0 of world 1 first."""
    if job.world is None:
        job.join(0, 1)
    world = job.world or 1
    return np.concatenate([get_slice(job, r, world, step, timeout=0).ids for r in range(world)])


def start_server(stack: ExitStack, job: Job, address: str = "127.0.0.1:0", *, checkpoint: bool = False,
          **kw: Any) -> tuple[SamplerServer, int]:
    """`create_server(job, address, **kw)`; `stack` stops the server (a final checkpoint when
    `checkpoint`) and closes the job when it unwinds, also when the server fails to start."""
    from croupier.server.serving.service import create_server

    stack.callback(job.close)
    server, port = create_server(job, address, **kw)
    stack.callback(server.stop, 0, checkpoint=checkpoint)
    return server, port
