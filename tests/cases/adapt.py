"""Shared by the unit and integration tests of one topic: B, HOT, SIZES, losses_of."""

from __future__ import annotations

import numpy as np

SIZES = [200] * 8
B = 32
HOT = 0  # the cluster whose loss is 5x the others'


def losses_of(ids: np.ndarray) -> np.ndarray:
    cluster = np.asarray(ids) // 200
    return np.where(cluster == HOT, 5.0, 1.0) * (1.0 + 0.05 * np.cos(np.asarray(ids, dtype=np.float64)))
