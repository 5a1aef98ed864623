"""A consumer's shard reader under a node agent: the agent's cache, read in place.

The node's agent owns the cache (downloads, prefetch over the node's union of lookahead,
eviction under the node-wide limit; `croupier.client.agent.node_cache`). A consumer asks it to make
a step's shards present, then reads them from the shared cache directory with a
`ShardCache` that has no limit of its own and reads the index.json the agent fetched, so
nothing is downloaded twice on a node and no sample bytes pass through the agent. The
rank's own `cache_dir` / `cache_limit` do not apply (the dataset warns once when given).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from croupier.format.mds_index import INDEX_BASENAME


class AgentStore:
    """get / prefetch / release / stats / close, as `ShardCache`, through the node agent."""

    def __init__(self, transport: Any, remote: str, fingerprint: str | None, source: int | None = None) -> None:
        from croupier.client.readers.shard_cache import ShardCache

        self._transport = transport
        self._source = source
        local = Path(self._fetch(np.zeros(0, dtype=np.int64)))
        self._store = ShardCache(remote, local.parent, fingerprint=fingerprint, cache_limit=None, prefetch_threads=0,
                                 index_bytes=(local / INDEX_BASENAME).read_bytes())

    def get(self, ids: np.ndarray | Sequence[int]) -> list[dict[str, Any]]:
        ids = np.asarray(ids, dtype=np.int64)
        self._fetch(np.unique(self._store.index.shard_of(ids)))
        return self._store.get(ids)

    def _fetch(self, shards: np.ndarray) -> str:
        if self._source is None:
            return self._transport.fetch(shards)
        return self._transport.fetch(shards, source=self._source)

    def prefetch(self, ids: np.ndarray | Sequence[int]) -> None:
        """The agent prefetches for the whole node as it forwards slices; nothing to do here."""

    def start_prefetch(self) -> None:
        """Nothing to start: the node agent prefetches."""

    def release(self, ids: np.ndarray | Sequence[int]) -> None:
        """The agent releases a lane's needs when the server confirms its acknowledgement."""

    def stats(self) -> dict[str, float]:
        return self._store.stats()

    def close(self) -> None:
        self._store.close()
