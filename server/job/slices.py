"""A rank's slice of a step's global batch: the one cut the job's streams, GetSlice and
read-only readers all make."""

from __future__ import annotations

import numpy as np

from croupier.server.job.types import SliceData
from croupier.server.sampling.sequence_window import SequenceWindow
from croupier.server.sampling.token_stream import TokenSchedule, TokenStep
from croupier.topology import per_rank_batch

__all__ = ["cut_slice", "per_rank_size", "read_slice"]


def cut_slice(step: int, batch: np.ndarray | TokenStep, rank: int, world: int, count: int,
              global_batch: int) -> SliceData:
    """Ranks rank .. rank + count - 1's slice of a global batch (one after another), or (steps
    in tokens) a rank's equal part of the step's tokens with each document's token span."""
    if isinstance(batch, TokenStep):
        # a lane of several ranks (a node agent): their parts one after another; every part holds
        # exactly G / world stream tokens, so the agent splits them by the spans' token sums
        parts = [batch.part(r, world) for r in range(rank, rank + max(count, 1))]
        ids = np.concatenate([sl.ids for sl in parts]) if len(parts) > 1 else parts[0].ids
        spans = np.array([(a, b, n) for sl in parts for (a, b), n in zip(sl.ranges(), sl.lengths.tolist())],
                         dtype=np.int64).reshape(-1, 3)
        return SliceData(step=step, ids=ids, spans=spans)
    p = global_batch // world
    return SliceData(step=step, ids=batch[rank * p:(rank + count) * p])


def read_slice(seq: SequenceWindow, step: int, rank: int, world: int, count: int, stream: object,
               global_batch: int, wait: bool) -> SliceData | None:
    """A read-only reader's slice of `step` from the window or its own sampler
    (`SequenceWindow.peek`: neither the generator nor the window moves); None while it must
    wait (`wait`: an adaptive job's step not generated yet and not in the window)."""
    if wait and step not in seq.batches:
        return None
    batch = seq.peek(step, stream)
    if batch is None:
        return SliceData(step=step, ids=np.empty(0, dtype=np.int64), end=True)
    return cut_slice(step, batch, rank, world, count, global_batch)


def per_rank_size(schedule: TokenSchedule | None, global_batch: int, world: int) -> int:
    """What a rank of `world` gets per step: samples of the global batch, or (steps in tokens)
    tokens at the first step; ConfigError when it does not split evenly."""
    if schedule is None:
        return per_rank_batch(global_batch, world)
    schedule.check_world(world)
    return schedule.tokens_at(0) // world
