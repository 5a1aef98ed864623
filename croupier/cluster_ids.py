"""A layout from one cluster id per dataset index: a map-style dataset's cluster column.

`ClusterBatchSampler` (a `clusters=` array, list, tensor or Hugging Face column) and
`croupier simulate --cluster-ids FILE.npy` both build their layout here, so the same ids give
the same layout, the same sampler fingerprint and the same sequence. Index `i` belongs to
cluster `ids[i]`; -1 leaves the index out of sampling. Cluster ids are dense, 0..K-1 with
at least one index each, so per-cluster weights line up with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.layout import ClusterLayout

__all__ = ["cluster_id_array", "layout_from_cluster_ids", "load_cluster_ids"]


def _as_numpy(ids: Any) -> np.ndarray:
    """An ndarray of `ids` without a per-row Python loop where the container offers a bulk path."""
    if isinstance(ids, np.ndarray):
        return ids
    if hasattr(ids, "column_name") and hasattr(ids, "source"):  # a Hugging Face `datasets` Column
        ids = ids[:]  # one Arrow read; iterating the column would decode row by row
    elif hasattr(ids, "detach") and hasattr(ids, "cpu"):  # a torch tensor, possibly on a GPU
        ids = ids.detach().cpu().numpy()
    elif hasattr(ids, "to_numpy"):  # pyarrow arrays, pandas series
        ids = ids.to_numpy()
    try:
        return np.asarray(ids)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"cluster ids must be an array of integers (one per dataset index), "
                          f"got {type(ids).__name__}: {exc}") from None


def cluster_id_array(ids: Any, what: str = "cluster ids") -> np.ndarray:
    """The validated int64 ids: 1-D, integers, each >= -1, not empty, not all -1, dense.

    `what` names the input in refusals (a flag and file, or "cluster ids").
    """
    arr = _as_numpy(ids)
    if arr.ndim != 1:
        raise ConfigError(f"{what} must be 1-D (one cluster id per dataset index), got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{what} must be integers (a cluster id per index, -1 = excluded), got dtype {arr.dtype}")
    if arr.size == 0:
        raise ConfigError(f"{what} are empty: give one cluster id per dataset index")
    arr = arr.astype(np.int64, copy=False)
    low = int(arr.min())
    if low < -1:
        i = int(np.flatnonzero(arr < -1)[0])
        raise ConfigError(f"{what} must be >= 0, or -1 for an excluded index; index {i} has {int(arr[i])}")
    high = int(arr.max())
    if high < 0:
        raise ConfigError(f"{what}: all {arr.size} indices are -1 (excluded); no index is left to sample")
    counts = np.bincount(arr[arr >= 0], minlength=high + 1)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise ConfigError(f"{what} must be dense (every id in 0..{high} used); cluster {int(missing[0])} has no "
                          f"index ({missing.size} unused ids in all): renumber them, e.g. with "
                          "numpy.unique(ids, return_inverse=True)")
    return arr


def layout_from_cluster_ids(ids: Any, what: str = "cluster ids") -> ClusterLayout:
    """The layout of a per-index cluster id array (see `cluster_id_array` for the rules)."""
    return ClusterLayout.from_assignments(cluster_id_array(ids, what))


def load_cluster_ids(path: str | Path, what: str | None = None) -> ClusterLayout:
    """The layout of a `.npy` file of per-index cluster ids (`numpy.save`), refused in one line if bad."""
    name = what or f"cluster ids {path}"
    p = Path(path)
    if p.suffix != ".npy":
        raise ConfigError(f"{name}: not a .npy file (write the ids with numpy.save(path, ids))")
    try:
        arr = np.load(p, allow_pickle=False)
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read it: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"{name}: not a readable .npy array of integers: {exc}") from None
    if not isinstance(arr, np.ndarray):  # np.load returns an NpzFile for an .npz renamed to .npy
        arr.close()
        raise ConfigError(f"{name}: holds several arrays (an .npz archive); save one 1-D array with numpy.save")
    return layout_from_cluster_ids(arr, name)
