"""Shared by the unit, integration and model tests of one topic: snapshot, corpus, read_back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from croupier.format.sidecar import Sidecar
from croupier.shards.build.synthetic import generate_corpus


@pytest.fixture(scope="module")
def corpus() -> list[dict]:
    return generate_corpus(3000, 8, seed=7)


def read_back(dataset: Path, cache: Path) -> list[dict]:
    """Every sample of an MDS dataset, in id order, through mosaicml-streaming's shard readers.

    Each shard file is checked against the index's sha1 and decompressed with streaming's own
    hash and codec functions, then read by the reader that `reader_from_json` makes for it.
    (This is what `Stream.prepare_shard` does, but streaming 0.13's version leaves every
    compressed file it reads open for the garbage collector: `open(zip).read()`.)
    """
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json
    from streaming.base.hashing import get_hash

    cache.mkdir(parents=True, exist_ok=True)
    index = json.loads((dataset / "index.json").read_text())
    out = []
    for info in index["shards"]:
        reader = reader_from_json(str(cache), None, info)
        for raw_info, zip_info in reader.file_pairs:
            stored = zip_info or raw_info
            data = (dataset / stored.basename).read_bytes()
            assert get_hash("sha1", data) == stored.hashes["sha1"], f"checksum of {stored.basename}"
            if zip_info is not None:
                data = decompress(reader.compression, data)
            (cache / raw_info.basename).write_bytes(data)
        out.extend(reader.get_item(i) for i in range(reader.samples))
    return out


def snapshot(out: Path) -> dict:
    side = Sidecar.open(out)
    return {"fp": side.fingerprint, "index": (out / "index.json").read_bytes(),
            "assign": np.asarray(side.assignments()).copy(), "emb": np.asarray(side.embeddings()).copy(),
            "centroids": side.centroids(), "manifest_sizes": side.manifest["sizes"]}
