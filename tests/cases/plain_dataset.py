"""A croupier dataset made with nothing but the plain install: MDS shards written with
streaming's `MDSWriter` and a cluster sidecar written with `croupier.format.sidecar`'s own
writer (the clusters given, as a user who brings their own writes them), so the tests of the
trainer side run where the `build` extra (embedders, faiss, pyarrow) is not installed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from croupier.format.fingerprint import index_fingerprint
from croupier.format.mds_index import INDEX_BASENAME
from croupier.format.sidecar import write_sidecar
from croupier.format.sidecar_layout import ARRAY_FILES, ASSIGNMENTS, CENTROIDS, MEMBERS, OFFSETS, SIDECAR_DIR
from workers.harness import write_mds


def assignments_of(num_samples: int, num_clusters: int) -> np.ndarray:
    """A long-tailed assignment: cluster c gets about twice the documents of cluster c + 1,
    its documents spread over the whole id range."""
    weights = 0.5 ** np.arange(num_clusters)
    bounds = np.cumsum(weights / weights.sum())
    ids = np.arange(num_samples)
    key = ((ids * 2654435761) % 2**32) / 2**32  # a fixed scatter of ids over [0, 1)
    return np.minimum(np.searchsorted(bounds, key, side="right"), num_clusters - 1).astype(np.int32)


def write_plain_dataset(root: Path, num_samples: int, num_clusters: int) -> Path:
    """MDS samples 0..n-1 (columns id, text) and a sidecar of `num_clusters` clusters in `root`."""
    write_mds(root, num_samples)
    assignments = assignments_of(num_samples, num_clusters)
    members = np.argsort(assignments, kind="stable").astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assignments, minlength=num_clusters))]).astype(np.int64)
    centroids = np.zeros((num_clusters, 4), dtype=np.float32)
    side = root / SIDECAR_DIR
    side.mkdir(parents=True, exist_ok=True)
    for role, array in ((OFFSETS, offsets), (MEMBERS, members), (ASSIGNMENTS, assignments),
                        (CENTROIDS, centroids)):
        np.save(side / ARRAY_FILES[role], array)
    fp = index_fingerprint((root / INDEX_BASENAME).read_bytes())
    write_sidecar(root, fingerprint=fp, layout="original", assignments=assignments, offsets=offsets,
                  members=members, centroids=centroids,
                  extra={"embedder": "given", "metric": "cosine", "text_field": "text",
                         "columns": {"id": "int", "text": "str"}})
    return root
