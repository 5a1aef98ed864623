"""Opening a croupier dataset by name: a local folder or an object-store URL, one way for all.

`croupier serve`, `simulate`, `report`, the demo, mixtures and the trainer's embedded mode
name a dataset the same way, so each of them accepts `s3://...` where any one does. A remote
dataset's sidecar (index and cluster arrays, not the embeddings) is copied afresh into a
local folder — the job's state directory when there is one (`SIDECAR_CACHE_DIR` under it),
else a temporary folder removed at exit — and the shards are read from the remote.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from croupier.format.remote import SIDECAR_CACHE_DIR, fetch_sidecar, is_remote
from croupier.format.sidecar import Sidecar

__all__ = ["SIDECAR_CACHE_DIR", "open_dataset", "read_location"]

_scratch: list[Path] = []


def _temporary_cache() -> Path:
    if not _scratch:
        path = Path(tempfile.mkdtemp(prefix="croupier-sidecars-"))
        _scratch.append(path)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return _scratch[0]


def open_dataset(dataset: str, sidecar_cache: str | Path | None = None) -> Sidecar:
    """The dataset's sidecar, its fingerprint checked against the shards' index.

    dataset: a folder built by `croupier shards build`, or a URL such as `s3://bucket/ds`.
    sidecar_cache: where a remote dataset's sidecar is copied (a folder of its own per URL
    inside); default a temporary folder for this process.
    """
    if is_remote(dataset):
        cache = Path(sidecar_cache) if sidecar_cache is not None else _temporary_cache()
        return Sidecar.open(fetch_sidecar(dataset, cache))
    return Sidecar.open(dataset)


def read_location(dataset: str, sidecar: Sidecar, remote: str | None = None) -> str:
    """Where ranks read the shards: `remote` if given, else the sidecar's own remote (an adopted
    dataset), else the dataset itself (a URL as given, a folder as an absolute path)."""
    if remote:
        return remote
    if sidecar.remote:
        return sidecar.remote
    return dataset if is_remote(dataset) else str(Path(dataset).resolve())
