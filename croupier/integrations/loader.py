"""`CroupierLoader`: a torchdata `StatefulDataLoader` over the rank's slices that times its waits.

A trainer adapter builds this loader itself rather than letting its framework wrap the
dataset (accelerate's `IterableDatasetShard`, dispatching from rank 0): croupier's dataset
already yields only this rank's slice, so any further split would train each rank on a
fraction of it.

Each batch the loader hands out, it records how long the trainer waited for it (the time
`next()` blocked: the data path's cost the trainer actually pays). `take_waits()` returns
and resets what was recorded since the last call, for the trainer's logger; `counters()`
reads the packer's counters (tokens dropped, padded, ...) out of the loader state, which
`StatefulDataLoader` keeps for every DataLoader worker, so they are the workers' own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

PACK_STATS = ("steps", "documents", "tokens_in", "tokens_packed", "tokens_padding", "tokens_dropped",
              "carry_dropped")


class CroupierLoader(StatefulDataLoader):
    """A `StatefulDataLoader` that records the wait of every batch it yields."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._waits: list[float] = []
        self.batches = 0  # yielded by this loader object (a restored loader counts from 0)

    def __iter__(self) -> Iterator[Any]:
        it = super().__iter__()
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._waits.append(time.perf_counter() - start)
            self.batches += 1
            yield batch

    def take_waits(self) -> list[float]:
        """The waits (seconds) of the batches yielded since the last call, oldest first."""
        waits, self._waits = self._waits, []
        return waits

    def counters(self) -> dict[str, float]:
        """The packer's counters and the shard readers' (cache hits, bytes read, waits), summed
        over this rank's DataLoader workers."""
        state = self.state_dict()
        return {**pack_counters(state), **reader_counters(state)}


READER_STATS = ("bytes_downloaded", "shards_downloaded", "shards_reused", "samples_read", "wait_seconds",
                "cache_bytes")
"""The shard-store counters a trainer's logs show (`CroupierIterableDataset.reader_stats`)."""


def pack_counters(state: Any) -> dict[str, int]:
    """Sums the `stats` of every packed-dataset state found anywhere in a loader state."""
    total: dict[str, int] = {}
    for stats in _pack_stats(state):
        for key in PACK_STATS:
            total[key] = total.get(key, 0) + int(stats.get(key, 0))
    return total


def reader_counters(state: Any) -> dict[str, float]:
    """Sums the shard readers' counters (`reader` of every dataset state in a loader state)."""
    total: dict[str, float] = {}
    for stats in _reader_stats(state):
        for key in READER_STATS:
            if key in stats:
                total[f"reader_{key}"] = total.get(f"reader_{key}", 0.0) + float(stats[key])
    return total


def _reader_stats(state: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(state, Mapping):
        reader = state.get("reader")
        if isinstance(reader, Mapping) and "sampler_fingerprint" in state:
            yield reader
            return
        for value in state.values():
            yield from _reader_stats(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _reader_stats(value)


def _pack_stats(state: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(state, Mapping):
        stats = state.get("stats")
        if isinstance(stats, Mapping) and "dataset" in state and "carry_tokens" in state:
            yield stats
            return
        for value in state.values():
            yield from _pack_stats(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            yield from _pack_stats(value)


def wait_logs(waits: list[float], prefix: str = "croupier/") -> dict[str, float]:
    """What a trainer logs of the waits since its last log: mean, max and total seconds per step."""
    if not waits:
        return {}
    return {f"{prefix}data_wait_s": sum(waits) / len(waits), f"{prefix}data_wait_max_s": max(waits),
            f"{prefix}data_wait_total_s": sum(waits)}
