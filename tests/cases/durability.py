"""Shared by the unit and integration tests of one topic: B, SIZES, reference."""

from __future__ import annotations

import numpy as np

from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler

SIZES = [5000, 300, 20, 1]


B = 64


def reference(n: int) -> list[np.ndarray]:
    s = Sampler(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B, seed=0)
    return [s.next_batch() for _ in range(n)]
