"""Shard cache over a local folder: compressed shards read where they are, no index copy
unless an agent shares the cache, and prefetch held while the reader's own thread reads its
first step."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter

from croupier.client.readers.mix_cache import MixStore
from croupier.client.readers.prefetch_pool import PrefetchPool
from croupier.client.readers.shard_cache import ShardCache
from croupier.errors import DatasetError
from tests.unit.test_shard_store import COLUMNS, make_sample, mismatches, write_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("local") / "ds", 400)


_BEFORE: set[threading.Thread] = set()


@pytest.fixture(autouse=True)
def _threads_before():
    """Prefetch threads another test left running are not this test's."""
    _BEFORE.clear()
    _BEFORE.update(threading.enumerate())


def _write_plain(root: Path, n: int) -> Path:
    """An uncompressed dataset (shards stored as they are read)."""
    with MDSWriter(out=str(root), columns=COLUMNS, hashes=["xxh64"], size_limit=2048) as writer:
        for i in range(n):
            writer.write(make_sample(i))
    return root


def _prefetch_threads() -> list[str]:
    """The prefetch threads started since the test began, still alive."""
    return [t.name for t in threading.enumerate() if t.name.startswith("croupier-prefetch") and t not in _BEFORE]


def _wait_resident(store: ShardCache, shards: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(store.is_resident(s) for s in shards):
        assert time.monotonic() < deadline, f"shards {shards} not all resident after {timeout}s"
        time.sleep(0.01)


def test_compressed_shards_of_a_local_folder_are_decompressed_from_where_they_are(dataset, tmp_path):
    remote_files = sorted(p.name for p in dataset.iterdir())
    store = ShardCache(dataset, tmp_path / "cache", prefetch_threads=0)
    assert mismatches(store.get(np.arange(400)), list(range(400))) == []
    cached = sorted(p.name for p in store.local.iterdir() if p.is_file())
    assert cached == sorted(f"shard.{s:05d}.mds" for s in range(store.num_shards))  # no .zstd copy, no index
    assert sorted(p.name for p in dataset.iterdir()) == remote_files  # the folder is left as it was
    st = store.stats()
    assert st["shards_downloaded"] == store.num_shards and st["bytes_downloaded"] == \
        store.shard_fetch_bytes(np.arange(store.num_shards))
    store.close()


def test_the_index_copy_is_written_only_for_a_shared_cache(dataset, tmp_path):
    plain = ShardCache(dataset, tmp_path / "a")
    assert not plain.local.exists()  # nothing written before a shard is read
    shared = ShardCache(dataset, tmp_path / "b", share_index=True)
    assert (shared.local / "index.json").read_bytes() == (dataset / "index.json").read_bytes()


def test_a_held_prefetch_loads_nothing_until_started(dataset, tmp_path):
    store = ShardCache(dataset, tmp_path / "cache", prefetch_threads=2, hold_prefetch=True)
    shards_of = store.index.shard_of(np.arange(400))
    first = [int(i) for i in np.flatnonzero(shards_of == 0)[:5]]
    later = [int(np.flatnonzero(shards_of == s)[0]) for s in (1, 2, 3)]
    store.prefetch(first)
    store.prefetch(later)
    assert _prefetch_threads() == [] and store.stats()["shards_downloaded"] == 0
    assert mismatches(store.get(first), first) == []  # the reading thread loads its step itself
    assert store.stats()["shards_downloaded"] == 1 and _prefetch_threads() == []
    store.release(first)
    store.start_prefetch()
    assert len(_prefetch_threads()) == 2
    _wait_resident(store, [1, 2, 3])
    assert mismatches(store.get(later), later) == []
    st = store.stats()
    assert st["shards_downloaded"] == 4 and st["shards_reused"] == 0
    store.close()
    assert _prefetch_threads() == []


def test_start_prefetch_with_nothing_wanted_starts_no_thread(dataset, tmp_path):
    store = ShardCache(dataset, tmp_path / "cache", prefetch_threads=2, hold_prefetch=True)
    store.prefetch([0])
    assert mismatches(store.get([0]), [0]) == []
    store.start_prefetch()
    assert _prefetch_threads() == []
    store.prefetch([399])  # a later need starts the threads as without the hold
    assert len(_prefetch_threads()) == 2
    _wait_resident(store, [int(store.index.shard_of(np.array([399]))[0])])
    store.close()


def test_a_mixture_starts_the_prefetch_of_sources_opened_after_its_first_step(tmp_path):
    sets = [write_dataset(tmp_path / f"src{i}", 120 + 40 * i) for i in range(2)]

    class Src:
        def __init__(self, i: int, offset: int, size: int) -> None:
            self.name, self.remote, self.offset, self.size = f"s{i}", str(sets[i]), offset, size

    sources = [Src(0, 0, 120), Src(1, 120, 160)]
    pool = PrefetchPool(2)
    stores: list[ShardCache] = []

    def open_source(i, src, limit):
        stores.append(ShardCache(src.remote, tmp_path / "cache", prefetch_pool=pool, hold_prefetch=True))
        return stores[-1]

    mix = MixStore(sources, open_source, None, on_close=pool.close)
    mix.prefetch([0, 1])
    assert mismatches(mix.get([0, 1]), [0, 1]) == []
    mix.release([0, 1])
    mix.start_prefetch()
    assert _prefetch_threads() == []  # nothing wanted yet
    mix.prefetch([120, 121])  # source 1 opens after the first step: its needs load in the background
    assert len(stores) == 2 and len(_prefetch_threads()) == 2
    _wait_resident(stores[1], [0])
    assert stores[1].stats()["shards_downloaded"] == 1
    got = mix.get([120, 121])
    assert [g["id"] for g in got] == [0, 1] and mismatches(got, [0, 1]) == []
    mix.close()
    assert _prefetch_threads() == []


def test_a_cached_uncompressed_shard_keeps_its_bytes_when_the_folder_rewrites_it(tmp_path):
    remote = _write_plain(tmp_path / "plain", 200)
    store = ShardCache(remote, tmp_path / "cache", prefetch_threads=0)
    assert mismatches(store.get(np.arange(200)), list(range(200))) == []
    name = "shard.00000.mds"
    with open(remote / name, "r+b") as f:  # a writer rewriting the file in place (same inode)
        f.seek(-3, os.SEEK_END)
        f.write(b"\xff\xff\xff")
    assert os.stat(store.local / name).st_ino != os.stat(remote / name).st_ino
    assert mismatches(store.get(np.arange(200)), list(range(200))) == []  # the cache read its copy
    store.close()


def test_a_corrupt_uncompressed_shard_is_named_and_the_others_read(tmp_path):
    remote = _write_plain(tmp_path / "plain", 200)
    store = ShardCache(remote, tmp_path / "cache", download_attempts=1, prefetch_threads=0)
    sid = int(store.index.shard_of(np.array([100]))[0])
    name = f"shard.{sid:05d}.mds"
    data = bytearray((remote / name).read_bytes())
    data[-3] ^= 0xFF
    (remote / name).write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"shard file {name} from .* is corrupt: xxh64 expected [0-9a-f]+, "
                                           rf"got [0-9a-f]+"):
        store.get([100])
    assert not (store.local / name).exists() and (remote / name).exists()  # the copy went, the file stays
    others = [i for i in range(200) if int(store.index.shard_of(np.array([i]))[0]) != sid]
    assert mismatches(store.get(others), others) == []
    store.close()
