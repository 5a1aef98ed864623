"""The store a rank reads a job's samples through: one dataset's shard cache, a mixture's
sources, or the node agent's cache.

`open_job_store` picks it from the job (`JobInfo` or the embedded job: its sources, remote
and fingerprints) and how the rank reads (through a node agent or not). A rank reading a
local folder holds its prefetch threads while it reads its first step (`hold_prefetch` of
`ShardCache`): the reading thread then loads that step's shards with no thread contending
with it, and the threads take over the later steps once `start_prefetch()` is called. A
remote store (s3://, gs://, ...) prefetches from the first need on, downloads in parallel.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from croupier.errors import ConfigError
from croupier.format.remote import is_remote


def open_job_store(job: Any, client: Any, *, job_name: str, remote: str | None, cache_dir: str | Path,
                   cache_limit: int | None, prefetch_threads: int) -> Any:
    """The store for `job` (get / prefetch / start_prefetch / release / stats / close).

    client: the rank's source of slices; one with a non-empty `agent` reads through the node
    agent (`croupier.client.agent`). remote: the dataset's remote given by the user, which
    replaces the job's (one dataset only)."""
    from croupier.client.readers.shard_cache import ShardCache

    agent = client is not None and bool(getattr(client, "agent", ""))
    if len(job.sources) > 1:
        return _open_mix_store(job, client if agent else None, job_name=job_name, remote=remote,
                               cache_dir=cache_dir, cache_limit=cache_limit, prefetch_threads=prefetch_threads)
    remote = remote or job.dataset_remote
    if not remote:
        raise ConfigError(f"job {job_name!r} names no dataset remote; pass remote= to the dataset")
    if agent:
        from croupier.client.agent.consumer_store import AgentStore

        return AgentStore(client.transport(), remote, job.dataset_fingerprint or None)
    return ShardCache(remote, cache_dir, fingerprint=job.dataset_fingerprint or None, cache_limit=cache_limit,
                      prefetch_threads=prefetch_threads, hold_prefetch=not is_remote(remote))


def _open_mix_store(job: Any, agent_client: Any, *, job_name: str, remote: str | None, cache_dir: str | Path,
                    cache_limit: int | None, prefetch_threads: int) -> Any:
    """A mixture job: each source read from its own remote and cache (`croupier.client.readers.mix_cache`)."""
    from croupier.client.readers.mix_cache import MixStore
    from croupier.client.readers.prefetch_pool import PrefetchPool
    from croupier.client.readers.shard_cache import ShardCache

    if remote:
        raise ConfigError(f"remote={remote!r} names one dataset, but job {job_name!r} is a mixture of "
                          f"{len(job.sources)} sources, each read from its own remote")
    if agent_client is not None:
        from croupier.client.agent.consumer_store import AgentStore

        transport = agent_client.transport()

        def open_agent_source(i: int, src: Any, limit: int | None) -> Any:  # the node cache
            return AgentStore(transport, src.remote, src.fingerprint or None, source=i)

        return MixStore(list(job.sources), open_agent_source, None)

    pool = PrefetchPool(prefetch_threads) if prefetch_threads else None

    def open_source(i: int, src: Any, limit: int | None) -> Any:
        return ShardCache(src.remote, cache_dir, fingerprint=src.fingerprint or None, cache_limit=limit,
                          prefetch_threads=prefetch_threads, prefetch_pool=pool,
                          hold_prefetch=not is_remote(src.remote))

    return MixStore(list(job.sources), open_source, cache_limit, on_close=None if pool is None else pool.close)


__all__ = ["open_job_store"]
