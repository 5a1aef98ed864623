"""Shared by the unit and integration tests of one topic: B, SIZES, reference, fetch."""

from __future__ import annotations

import numpy as np

from croupier.layout import ClusterLayout
from croupier.proto import pb2, slice_ids
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler

SIZES = [5000, 300, 20, 1]


B = 64


def reference(n: int) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0)
    return [s.next_batch() for _ in range(n)]


def fetch(stub, world: int, start: int, stop: int) -> list[np.ndarray]:
    """Global batches of [start, stop) as `world` lock-step ranks read and acknowledge them."""
    out = []
    for t in range(start, stop):
        parts = [slice_ids(stub.GetSlice(pb2.GetSliceRequest(rank=r, world_size=world, step=t), timeout=20).slice)
                 for r in range(world)]
        for r in range(world):
            stub.Ack(pb2.AckRequest(rank=r, world_size=world, next_step=t + 1), timeout=20)
        out.append(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
    return out
