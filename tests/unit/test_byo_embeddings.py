"""`croupier shards build --embeddings FILE|FIELD` and `--embedder none`: the user's vectors and
clusters in place of the embedder, validated, stored float16, their provenance in the sidecar."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cases.shards_build import read_back
from croupier.cli import main
from croupier.errors import ConfigError, DatasetError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.grouping import read_grouping
from croupier.shards.build.synthetic import generate_corpus, write_jsonl

N, DIM = 240, 12


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict], np.ndarray]:
    folder = tmp_path_factory.mktemp("byo")
    docs = generate_corpus(N, 5, seed=3)
    vectors = np.random.default_rng(0).standard_normal((N, DIM)).astype(np.float32)
    for i, (d, v) in enumerate(zip(docs, vectors)):
        d["vec"] = v.tolist()
        d["uid"] = f"doc-{i}"
        d["text"] = f"{i}: {d['text']}"  # every text unique: a sample's text names its input position
    write_jsonl(folder / "in.jsonl", docs)
    np.save(folder / "emb.npy", vectors)
    return folder, docs, vectors


def _cfg(folder: Path, out: str, **kw: object) -> BuildConfig:
    return BuildConfig(out=str(folder / out), inputs=(str(folder / "in.jsonl"),), progress=False, **kw)  # type: ignore[arg-type]


def _positions(out: Path, cache: Path) -> tuple[np.ndarray, list[dict]]:
    samples = read_back(out, cache)
    return np.array([int(s["text"].split(":", 1)[0]) for s in samples]), samples


def test_given_npy_and_cluster_field_make_the_fields_clusters(inputs, tmp_path):
    folder, docs, vectors = inputs
    res = build(_cfg(folder, "a", embeddings=str(folder / "emb.npy"), group_by="topic", embedder="none"))
    side = Sidecar.open(res.out)
    pos, samples = _positions(Path(res.out), tmp_path / "cache")
    grouping = read_grouping(side)
    assert grouping is not None
    assign = np.asarray(side.assignments())
    # the sidecar's clusters are the field's values: cluster of every sample -> its topic
    got = [grouping.names[grouping.cluster_groups[c]] for c in assign]
    assert got == [str(docs[p]["topic"]) for p in pos]
    assert side.num_clusters == len({d["topic"] for d in docs})
    # the embeddings are the given ones, float16, in the sample order
    np.testing.assert_array_equal(np.asarray(side.embeddings()), vectors[pos].astype(np.float16))
    emb = side.manifest["embedder"]
    sha = hashlib.sha256((folder / "emb.npy").read_bytes()).hexdigest()
    assert emb == {"name": "given", "dim": DIM, "from": "file", "file": "emb.npy", "path": str(folder / "emb.npy"),
                   "sha256": sha, "dtype": "float32", "rows": N}
    assert side.manifest["provenance"] == {
        "embeddings": {"from": "file", "file": "emb.npy", "path": str(folder / "emb.npy"), "sha256": sha,
                       "dtype": "float32", "rows": N},
        "clusters": {"from": "field", "field": "topic"}}


def test_a_list_field_feeds_kmeans_and_kmeans_inside_groups(inputs, tmp_path):
    folder, docs, vectors = inputs
    res = build(_cfg(folder, "b", embeddings="vec", clusters=4, layout="original"))
    side = Sidecar.open(res.out)
    np.testing.assert_array_equal(np.asarray(side.embeddings()), vectors.astype(np.float16))
    assert side.num_clusters == 4 and side.manifest["provenance"]["embeddings"] == {"from": "field", "field": "vec"}
    assert side.manifest["provenance"]["clusters"] == {"from": "k-means", "clusters": 4}
    # k-means inside the groups runs on the given vectors: same centroids as from the .npy
    a = build(_cfg(folder, "c", embeddings="vec", group_by="topic", clusters_per_group=2))
    b = build(_cfg(folder, "d", embeddings=str(folder / "emb.npy"), group_by="topic", clusters_per_group=2))
    sa, sb = Sidecar.open(a.out), Sidecar.open(b.out)
    np.testing.assert_array_equal(sa.centroids(), sb.centroids())
    np.testing.assert_array_equal(np.asarray(sa.assignments()), np.asarray(sb.assignments()))
    assert sa.manifest["provenance"]["clusters"]["from"] == "field+k-means"


def test_embedder_none_with_a_cluster_field_embeds_nothing(inputs, tmp_path):
    folder, docs, _ = inputs
    rc = main(["shards", "build", str(folder / "in.jsonl"), "--out", str(tmp_path / "e"), "--embedder", "none",
               "--group-by", "topic", "--quiet", "--no-tail-check"])
    assert rc == 0
    side = Sidecar.open(tmp_path / "e")
    assert side.embeddings().shape == (N, 0) and side.manifest["embedder"] == {"name": "none", "dim": 0}
    assert side.manifest["provenance"]["embeddings"] == {"from": "none"}
    assert sorted(side.sizes.tolist()) == sorted(np.bincount([d["topic"] for d in docs]).tolist())


def test_a_mismatched_length_is_refused_naming_both(inputs, tmp_path):
    folder, _, vectors = inputs
    np.save(tmp_path / "short.npy", vectors[:N - 3])
    with pytest.raises(DatasetError, match=rf"holds {N - 3} embeddings but the inputs hold {N} documents"):
        build(_cfg(folder, "f", embeddings=str(tmp_path / "short.npy"), group_by="topic"))
    np.save(tmp_path / "ints.npy", np.zeros((N, 4), dtype=np.int32))
    with pytest.raises(DatasetError, match=r"must be a 2-D float array \(N, dim\), got int32 \(240, 4\)"):
        build(_cfg(folder, "g", embeddings=str(tmp_path / "ints.npy"), clusters=3))
    big = vectors.copy()
    big[7, 2] = 1e6
    np.save(tmp_path / "big.npy", big)
    with pytest.raises(DatasetError, match=r"document 7 has the value 1000000.0 at dimension 2, not a finite number"):
        build(_cfg(folder, "h", embeddings=str(tmp_path / "big.npy"), clusters=3))


def test_a_parquet_column_keyed_against_the_inputs(inputs, tmp_path):
    folder, docs, vectors = inputs
    uids = [d["uid"] for d in docs]
    pq.write_table(pa.table({"uid": uids, "embedding": [v.tolist() for v in vectors]}), tmp_path / "e.parquet")
    res = build(_cfg(folder, "p", embeddings=str(tmp_path / "e.parquet"), embeddings_key="uid", clusters=3,
                     layout="original"))
    side = Sidecar.open(res.out)
    np.testing.assert_array_equal(np.asarray(side.embeddings()), vectors.astype(np.float16))
    assert side.manifest["provenance"]["embeddings"]["key"] == "uid"
    swapped = uids[:]
    swapped[5], swapped[6] = swapped[6], swapped[5]
    pq.write_table(pa.table({"uid": swapped, "embedding": [v.tolist() for v in vectors]}), tmp_path / "s.parquet")
    with pytest.raises(DatasetError, match=r"row 5 has uid 'doc-6' but document 5 of the inputs has 'doc-5'"):
        build(_cfg(folder, "q", embeddings=str(tmp_path / "s.parquet"), embeddings_key="uid", clusters=3))


def test_settings_that_cannot_make_clusters_are_refused(inputs):
    folder, _, _ = inputs
    with pytest.raises(ConfigError, match="--embedder none needs --group-by FIELD"):
        _cfg(folder, "x", embedder="none")
    with pytest.raises(ConfigError, match="--embedder none cannot run k-means inside the groups"):
        _cfg(folder, "x", embedder="none", group_by="topic", clusters_per_group=2)
    with pytest.raises(ConfigError, match="unknown embedder 'nope'"):
        _cfg(folder, "x", embedder="nope")
    with pytest.raises(ConfigError, match="--embeddings-column and --embeddings-key apply to a .parquet file"):
        _cfg(folder, "x", embeddings="vec", embeddings_key="uid")
