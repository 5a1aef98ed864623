"""Shard cache: real MDS datasets (zstd, hashes) written with MDSWriter, read back by global id."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter

from croupier.client.readers.shard_cache import ShardCache, ShardStore
from croupier.errors import ConfigError, DatasetError, FingerprintMismatch
from croupier.format.fingerprint import index_fingerprint
from croupier.format.id_table import SampleIdError, ShardTable

COLUMNS = {"id": "int", "text": "str", "vec": "ndarray:int32"}


def make_sample(i: int, version: int = 0) -> dict:
    return {"id": i, "text": f"v{version} sample {i} " + "abc" * (i % 41),
            "vec": (np.arange(1 + i % 5, dtype=np.int32) + i * 7 + version)}


def write_dataset(root: Path, n: int, version: int = 0, size_limit: int = 2048) -> Path:
    with MDSWriter(out=str(root), columns=COLUMNS, compression="zstd", hashes=["sha1", "xxh64"],
                   size_limit=size_limit) as writer:
        for i in range(n):
            writer.write(make_sample(i, version))
    return root


def mismatches(samples: list[dict], ids, version: int = 0) -> list[int]:
    """The ids whose sample is not what was written for them; an id without a sample (or a sample
    beyond the ids, counted as id -1) is one."""
    ids = np.asarray(ids).tolist()
    bad = ids[len(samples):] + [-1] * (len(samples) - len(ids))
    for got, i in zip(samples, ids):
        want = make_sample(i, version)
        if got["id"] != i or got["text"] != want["text"] or not np.array_equal(got["vec"], want["vec"]):
            bad.append(i)
    return bad


def cached_shard_bytes(store: ShardCache) -> int:
    """Bytes of decompressed shards on disk (what cache_limit bounds; files may vanish meanwhile)."""
    total = 0
    for p in store.local.glob("shard.*.mds"):
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("remote") / "ds", 600)


# -- id -> shard table ------------------------------------------------------------------------------
def test_shard_index_locates_ids_across_empty_shards():
    counts = np.array([3, 0, 5, 1, 0, 4])
    table = ShardTable(counts)
    ids = np.arange(table.num_samples)
    shard, offset = table.locate(ids)
    assert shard.tolist() == np.repeat(np.arange(6), counts).tolist()
    assert offset.tolist() == np.concatenate([np.arange(c) for c in counts]).tolist()
    with pytest.raises(SampleIdError, match="sample id 13 is outside the dataset"):
        table.locate([0, 13])
    with pytest.raises(SampleIdError, match="sample id -1"):
        table.shard_of(np.array([-1]))
    with pytest.raises(ConfigError, match="negative sample count"):
        ShardTable([2, -1])


# -- reading ----------------------------------------------------------------------------------------
def test_reads_every_id_back_in_any_order(dataset, tmp_path):
    with ShardCache(dataset, tmp_path / "cache", prefetch_threads=2) as store:
        assert store.num_samples == 600 and store.num_shards > 5
        assert store.hash_algorithm == "xxh64"  # validated with streaming's check on download
        assert store.local == tmp_path / "cache" / store.fingerprint.replace(":", "-")
        order = np.random.default_rng(1).permutation(600)
        store.prefetch(order[:300])
        first = store.get(order[:300])
        rest = store.get(order[300:])  # not prefetched: fetched on demand
        assert mismatches(first + rest, order) == []
        assert store.get([5, 5, 5])[0] is not store.get([5])[0]  # fresh dicts: callers may mutate
        store.release(order[:300])
        st = store.stats()
        assert st["shards_downloaded"] == store.num_shards
        assert st["bytes_downloaded"] == store.shard_fetch_bytes(np.arange(store.num_shards))
        assert st["samples_read"] == 604 and st["pinned_shards"] == 0 and st["pending_ids"] == 0
    with ShardCache(dataset, tmp_path / "cache") as again:  # a second run reuses the cache
        assert mismatches(again.get(np.arange(600)), np.arange(600)) == []
        assert again.stats()["shards_downloaded"] == 0


def test_fingerprint_is_checked_against_the_remote_index(dataset, tmp_path):
    fp = index_fingerprint((dataset / "index.json").read_bytes())
    assert ShardCache(dataset, tmp_path, fingerprint=fp).fingerprint == fp
    with pytest.raises(FingerprintMismatch, match="expected mds:0000, got " + fp):
        ShardCache(dataset, tmp_path, fingerprint="mds:0000")
    with pytest.raises(DatasetError, match="no index.json at"):
        ShardCache(tmp_path / "nowhere", tmp_path)
    with pytest.raises(ConfigError, match=r"cache_limit 100 bytes cannot hold shard shard\.\d{5}\.mds\.zstd of \d+ bytes"):
        ShardCache(dataset, tmp_path, cache_limit=100)


def test_rewritten_dataset_never_mixes_old_and_new_samples(tmp_path):
    remote = write_dataset(tmp_path / "remote", 300)
    old = ShardCache(remote, tmp_path / "cache")
    assert mismatches(old.get(np.arange(100)), np.arange(100)) == []  # some shards cached

    for f in remote.iterdir():
        f.unlink()
    write_dataset(remote, 300, version=1)

    with pytest.raises(FingerprintMismatch):
        ShardCache(remote, tmp_path / "cache", fingerprint=old.fingerprint)
    new = ShardCache(remote, tmp_path / "cache")
    assert new.local != old.local
    assert mismatches(new.get(np.arange(300)), np.arange(300), version=1) == []
    # The old store still holds the old index: a shard it has not cached now fails its hash
    # check instead of silently returning rewritten samples.
    with pytest.raises(DatasetError, match=r"is corrupt: xxh64 expected"):
        old.get([299])
    assert mismatches(old.get(np.arange(100)), np.arange(100)) == []  # its cache is intact
    old.close()
    new.close()


def test_corrupt_or_missing_shard_is_named(tmp_path):
    remote = write_dataset(tmp_path / "remote", 300)
    store = ShardCache(remote, tmp_path / "cache", download_attempts=1)
    sid, _ = store.index.locate([150])
    name = f"shard.{int(sid[0]):05d}.mds.zstd"
    path = remote / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"shard file {name} from .* is corrupt: xxh64 expected [0-9a-f]+, got [0-9a-f]+"):
        store.get([150])
    assert not (store.local / name).exists() and not (store.local / name[:-5]).exists()
    assert path.read_bytes() == bytes(data)  # read where it is: the folder's file is left as it was
    store.prefetch([150])  # a failed background fetch surfaces at get()
    with pytest.raises(DatasetError, match=name):
        store.get([150])

    last = store.num_shards - 1
    missing = f"shard.{last:05d}.mds.zstd"
    (remote / missing).unlink()
    with pytest.raises(DatasetError, match=rf"shard file {missing} is missing from"):
        store.get([store.num_samples - 1])
    assert mismatches(store.get([0, 1]), [0, 1]) == []  # the others still read
    store.close()


def test_eviction_keeps_cache_under_limit_and_samples_correct(dataset, tmp_path):
    probe = ShardCache(dataset, tmp_path / "probe")
    limit = int(np.sort(probe.shard_sizes)[-3:].sum())  # room for the three largest shards
    store = ShardCache(dataset, tmp_path / "cache", cache_limit=limit, prefetch_threads=3)
    # Sequential order in batches, two batches of lookahead: each shard is fetched once.
    batches = np.array_split(np.arange(600), 60)
    for b in batches[:2]:
        store.prefetch(b)
    for t, b in enumerate(batches):
        if t + 2 < len(batches):
            store.prefetch(batches[t + 2])
        assert mismatches(store.get(b), b) == []
        store.release(b)
        assert cached_shard_bytes(store) <= limit
    st = store.stats()
    assert st["shards_downloaded"] == store.num_shards
    assert st["peak_cache_bytes"] <= limit and st["evictions"] >= store.num_shards - 3
    # A random order without prefetch still reads correctly and stays under the limit.
    order = np.random.default_rng(2).permutation(600)
    for b in np.array_split(order, 20):
        assert mismatches(store.get(b), b) == []
        assert cached_shard_bytes(store) <= limit
    assert store.stats()["peak_cache_bytes"] <= limit
    store.close()


def test_threads_of_one_process_share_a_store(dataset, tmp_path):
    probe = ShardCache(dataset, tmp_path / "probe")
    limit = int(np.sort(probe.shard_sizes)[-6:].sum())
    store = ShardCache(dataset, tmp_path / "cache", cache_limit=limit, prefetch_threads=2)
    bad: list[int] = []

    def reader(seed: int) -> None:
        for b in np.array_split(np.random.default_rng(seed).permutation(600), 10):
            store.prefetch(b)
            bad.extend(mismatches(store.get(b), b))
            store.release(b)

    threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert bad == [] and not any(t.is_alive() for t in threads)
    st = store.stats()
    assert st["samples_read"] == 1800 and st["pending_ids"] == 0 and st["pinned_shards"] == 0
    store.close()


# -- processes --------------------------------------------------------------------------------------
def _reader_process(remote: str, cache: str, limit: int, seed: int, out) -> None:
    store = ShardCache(remote, cache, cache_limit=limit, prefetch_threads=2)
    order = np.random.default_rng(seed).permutation(600)
    batches = np.array_split(order, 30)
    bad = []
    store.prefetch(batches[0])
    for t, b in enumerate(batches):
        if t + 1 < len(batches):
            store.prefetch(batches[t + 1])
        bad += mismatches(store.get(b), b)
        store.release(b)
    store.close()
    out.put((seed, bad))


@pytest.mark.slow
def test_two_processes_share_one_cache_dir(dataset, tmp_path):
    probe = ShardCache(dataset, tmp_path / "probe")
    limit = int(np.sort(probe.shard_sizes)[-4:].sum())
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_reader_process, args=(str(dataset), str(tmp_path / "cache"), limit, seed, out))
             for seed in (10, 11, 12)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=90) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert results == {10: [], 11: [], 12: []}
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def _child_read(store: ShardCache, ids, out) -> None:
    out.put((os.getpid(), mismatches(store.get(ids), ids), store.stats()["samples_read"]))


@pytest.mark.slow
def test_store_works_after_fork_and_pickling(dataset, tmp_path):
    store = ShardCache(dataset, tmp_path / "cache", cache_limit=20_000, prefetch_threads=2)
    store.prefetch(np.arange(0, 600, 7))  # the parent has threads and pinned shards now
    assert mismatches(store.get(np.arange(0, 50)), np.arange(0, 50)) == []
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    ids = [np.arange(550, 600), np.arange(100, 600, 13)]
    procs = [ctx.Process(target=_child_read, args=(store, i, out)) for i in ids]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    assert all(bad == [] for _, bad, _ in results)
    assert sorted(n for _, _, n in results) == sorted(len(i) for i in ids)  # per-process counters
    assert mismatches(store.get(np.arange(0, 600, 7)), np.arange(0, 600, 7)) == []  # parent unharmed
    store.release(np.arange(0, 600, 7))

    clone = pickle.loads(pickle.dumps(store))  # what a spawned DataLoader worker receives
    assert mismatches(clone.get([599, 3]), [599, 3]) == []
    clone.close()
    store.close()


# -- a cache left by an earlier run is verified on first use ----------------------------------------
def _flip_text_byte(path: Path, marker: bytes) -> None:
    """Same-size corruption: one byte inside a sample's text becomes 0xFF."""
    data = bytearray(path.read_bytes())
    at = data.index(marker)
    data[at + 1] = 0xFF
    path.write_bytes(bytes(data))


def test_same_size_corruption_of_a_cached_shard_is_detected_and_repaired(tmp_path, caplog):
    remote = write_dataset(tmp_path / "remote", 300)
    with ShardCache(remote, tmp_path / "cache") as first:
        assert mismatches(first.get(np.arange(300)), np.arange(300)) == []
        sid, _ = first.index.locate([150])
        raw = first.local / f"shard.{int(sid[0]):05d}.mds"
    size = raw.stat().st_size
    _flip_text_byte(raw, b"sample 150 ")
    assert raw.stat().st_size == size

    with ShardCache(remote, tmp_path / "cache") as second:
        with caplog.at_level("WARNING", logger="croupier.client.readers.shard_fetch"):
            assert mismatches(second.get(np.arange(300)), np.arange(300)) == []
        stats = second.stats()
    assert stats["cache_repairs"] == 1
    assert stats["shards_downloaded"] == 1 and stats["shards_reused"] == second.num_shards - 1
    assert f"cached shard {raw.name}.zstd" in caplog.text and "xxh64 expected" in caplog.text


def test_damaged_header_of_a_cached_shard_without_hashes_is_repaired(tmp_path):
    remote = tmp_path / "remote"
    with MDSWriter(out=str(remote), columns=COLUMNS, compression="zstd", size_limit=2048) as writer:
        for i in range(200):
            writer.write(make_sample(i))
    with ShardCache(remote, tmp_path / "cache") as first:
        first.get(np.arange(200))
        raw = first.local / "shard.00001.mds"
    data = bytearray(raw.read_bytes())
    data[8:12] = (1 << 30).to_bytes(4, "little")  # an offset pointing far outside the file
    raw.write_bytes(bytes(data))
    with ShardCache(remote, tmp_path / "cache") as second:
        assert mismatches(second.get(np.arange(200)), np.arange(200)) == []
        assert second.stats()["cache_repairs"] == 1


def test_a_sample_that_cannot_be_decoded_is_a_dataset_error_naming_the_shard(tmp_path):
    remote = tmp_path / "remote"  # no hashes: a same-size corruption passes every check but decoding
    with MDSWriter(out=str(remote), columns=COLUMNS, compression="zstd", size_limit=2048) as writer:
        for i in range(200):
            writer.write(make_sample(i))
    with ShardCache(remote, tmp_path / "cache") as first:
        sid, _ = first.index.locate([120])
        first.get([120])
        raw = first.local / f"shard.{int(sid[0]):05d}.mds"
    _flip_text_byte(raw, b"sample 120 ")
    with ShardCache(remote, tmp_path / "cache") as second:
        with pytest.raises(DatasetError, match=rf"sample 120 \(offset \d+ of shard {raw.name}\.zstd in .*\) "
                                               r"cannot be read: UnicodeDecodeError"):
            second.get([120])
        assert mismatches(second.get([0, 1]), [0, 1]) == []  # the rest still reads


def test_shard_store_is_the_former_name_of_shard_cache():
    import croupier.client

    assert ShardStore is ShardCache
    assert croupier.client.ShardStore is ShardCache and croupier.client.ShardCache is ShardCache
