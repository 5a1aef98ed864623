"""Shared by the unit and integration tests of one topic: snapshot, corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from croupier.format.sidecar import Sidecar
from croupier.shards.build.synthetic import generate_corpus


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return generate_corpus(3000, 8, seed=7)


def snapshot(out: Path) -> dict:
    side = Sidecar.open(out)
    return {"fp": side.fingerprint, "index": (out / "index.json").read_bytes(),
            "assign": np.asarray(side.assignments()).copy(), "emb": np.asarray(side.embeddings()).copy(),
            "centroids": side.centroids(), "manifest_sizes": side.manifest["sizes"]}
