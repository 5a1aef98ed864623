"""The on-disk format package: one parse of index.json, the id table, shard headers, the
sidecar's files map, atomic writes; and the client's independence from the writer side."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streaming import MDSWriter

from croupier.errors import DatasetError
from croupier.format.atomic import write_json_atomic
from croupier.format.fingerprint import index_fingerprint
from croupier.format.mds_index import MDSIndex
from croupier.format.mds_shard import file_fault, sample_offsets, split_samples


def _write(root: Path, n: int = 50, compression: str | None = "zstd", hashes=("sha1", "xxh64")) -> Path:
    with MDSWriter(out=str(root), columns={"id": "int", "text": "str"}, compression=compression,
                   hashes=list(hashes), size_limit=1024) as w:
        for i in range(n):
            w.write({"id": i, "text": f"sample {i} " + "xy" * (i % 13)})
    return root


def test_index_table_and_fingerprint_of_a_real_dataset(tmp_path):
    root = _write(tmp_path / "ds")
    index = MDSIndex.read(root)
    raw = json.loads((root / "index.json").read_bytes())
    assert index.num_shards == len(raw["shards"]) >= 2
    assert index.num_samples == 50
    assert index.columns == ("id", "text")
    assert index.fingerprint == index_fingerprint((root / "index.json").read_bytes())
    assert index.hash_algorithm() == "xxh64"  # the fastest both files record
    shards, offsets = index.table.locate([0, 49])
    assert shards.tolist() == [0, index.num_shards - 1]
    assert offsets[1] == index.shards[-1].samples - 1
    entry = index.shards[1]
    assert entry.stored is entry.zip and entry.raw.basename.endswith(".mds")


def test_index_refusals_name_the_file_and_the_rule(tmp_path):
    with pytest.raises(DatasetError, match="holds no MDS index.json"):
        MDSIndex.read(tmp_path)
    with pytest.raises(DatasetError, match="where.json is not a valid MDS index: format version must be 2, got 3"):
        MDSIndex(json.dumps({"version": 3, "shards": []}).encode(), "where.json")
    with pytest.raises(DatasetError, match="it lists no shards"):
        MDSIndex(json.dumps({"version": 2, "shards": []}).encode())
    with pytest.raises(DatasetError, match="shard 0 has a negative sample count -1"):
        MDSIndex(json.dumps({"version": 2, "shards": [{"samples": -1, "raw_data": {}}]}).encode())
    with pytest.raises(DatasetError, match="shard 0 raw_data is not a file record"):
        MDSIndex(json.dumps({"version": 2, "shards": [{"samples": 1}]}).encode())


def test_shard_bytes_are_checked_against_the_index_and_their_header(tmp_path):
    root = _write(tmp_path / "ds", compression=None)
    index = MDSIndex.read(root)
    entry = index.shards[0]
    data = (root / entry.raw.basename).read_bytes()
    assert file_fault(data, entry.raw) is None
    samples = split_samples(data, entry.samples, entry.raw.basename)
    assert len(samples) == entry.samples
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    assert file_fault(bytes(bad), entry.raw).startswith("sha1 expected ")
    assert file_fault(data[:-1], entry.raw) == f"{len(data) - 1} bytes, index.json says {len(data)}"
    wrong_count = bytearray(data)
    wrong_count[0] ^= 0x01
    with pytest.raises(DatasetError, match=rf"shard {entry.raw.basename} is corrupt: its header says"):
        sample_offsets(bytes(wrong_count), entry.samples, entry.raw.basename)
    wild = bytearray(data)
    wild[8:12] = (1 << 30).to_bytes(4, "little")  # the first sample's end points far outside the file
    with pytest.raises(DatasetError, match="sample offsets do not fit"):
        sample_offsets(bytes(wild), entry.samples, entry.raw.basename)


def test_sidecar_arrays_are_found_through_the_manifest_files_map(tmp_path, build_dataset):
    from croupier.format.sidecar import Sidecar

    ds = build_dataset(tmp_path, num_docs=120, topics=3)
    side = Sidecar.open(ds)
    offsets = side.offsets().copy()
    manifest_path = ds / "croupier" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["files"]) >= {"offsets", "assignments", "centroids", "embeddings"}
    (ds / "croupier" / "offsets.npy").rename(ds / "croupier" / "cluster-offsets.npy")
    manifest["files"]["offsets"] = "cluster-offsets.npy"
    manifest_path.write_text(json.dumps(manifest))
    assert np.array_equal(Sidecar.open(ds).offsets(), offsets)
    manifest["files"]["offsets"] = "../index.json"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="must be a relative path inside the sidecar"):
        Sidecar.open(ds)
    del manifest["files"]["offsets"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="lists no 'offsets' file"):
        Sidecar.open(ds)


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "state.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left
