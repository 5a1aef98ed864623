"""croupier.client: what a trainer imports.

    from croupier.client import CroupierIterableDataset, RankClient
    from croupier.client.errors import ClientError, Unauthenticated, ...

`CroupierIterableDataset` (torch), `ShardCache` (mosaicml-streaming) and `ClusterBatchSampler` (a batch
sampler for map-style datasets, no server) load on first use, so
importing the package for `RankClient` alone stays light. `ShardStore` is the former name of
`ShardCache`, kept as a deprecated alias.
"""

from __future__ import annotations

from typing import Any

from croupier.client.errors import (
    ClientError,
    InvalidRequest,
    Mismatch,
    NotFound,
    OutOfRange,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from croupier.client.rank_client import Backoff, RankClient

__all__ = [
    "Backoff", "ClientError", "ClusterBatchSampler", "CroupierIterableDataset", "InvalidRequest", "Mismatch",
    "NotFound", "OutOfRange", "PermissionDenied", "RankClient", "ShardCache", "ShardStore", "Unauthenticated",
    "Unavailable",
]


def __getattr__(name: str) -> Any:
    if name == "CroupierIterableDataset":
        from croupier.client.dataset import CroupierIterableDataset

        return CroupierIterableDataset
    if name == "ClusterBatchSampler":
        from croupier.client.batch_sampler import ClusterBatchSampler

        return ClusterBatchSampler
    if name in ("ShardCache", "ShardStore"):  # ShardStore: the deprecated former name
        from croupier.client.readers.shard_cache import ShardCache

        return ShardCache
    raise AttributeError(f"module 'croupier.client' has no attribute {name!r}")
