"""`croupier shards build --embed-cache DIR`: a sweep over clustering settings embeds once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from croupier.cli import main
from croupier.errors import ConfigError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.embed import HashingEmbedder
from croupier.shards.build.embed_cache import SUFFIX, EmbeddingCache, cache_key
from croupier.shards.build.synthetic import generate_corpus, write_jsonl


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return generate_corpus(600, 5, seed=3)


def _jsonl(path: Path, docs: list[dict]) -> Path:
    write_jsonl(path, docs)
    return path


def _build(tmp: Path, name: str, jsonl: Path, cache: Path | None, **kw) -> tuple:
    res = build(BuildConfig(out=str(tmp / name), inputs=(str(jsonl),), embedder="hashing", progress=False,
                            keep_fields=("topic",), embed_cache=None if cache is None else str(cache), **kw))
    return res, Sidecar.open(tmp / name)


def _no_embedding(self, texts):  # a build that reuses the cache must not embed anything
    raise AssertionError(f"embedded {len(texts)} texts although the cache holds them")


def test_second_build_reuses_the_embeddings_and_matches_a_build_without_cache(tmp_path, docs, monkeypatch):
    jsonl = _jsonl(tmp_path / "in.jsonl", docs)
    cache = tmp_path / "cache"
    first, side1 = _build(tmp_path, "k4", jsonl, cache, clusters=4)
    assert side1.manifest["embed_cache"]["hit"] is False and side1.manifest["embed_cache"]["fault"] is None
    stored = list(cache.glob(f"*{SUFFIX}"))
    assert len(stored) == 1 and stored[0].name == side1.manifest["embed_cache"]["key"] + SUFFIX
    assert np.load(stored[0]).shape == (len(docs), 256)
    plain, side_plain = _build(tmp_path, "k9-plain", jsonl, None, clusters=9)  # embeds itself
    assert "embed_cache" not in side_plain.manifest

    with monkeypatch.context() as m:
        m.setattr(HashingEmbedder, "encode", _no_embedding)
        again, side2 = _build(tmp_path, "k9", jsonl, cache, clusters=9)
        grouped, side3 = _build(tmp_path, "by-topic", jsonl, cache, group_by="topic")
    assert side2.manifest["embed_cache"] == {"key": stored[0].name[: -len(SUFFIX)], "hit": True, "fault": None}
    assert again.timings["embed"]["cached_docs"] == len(docs) and again.timings["embed"]["encode_seconds"] == 0.0
    assert side3.manifest["embed_cache"]["hit"] is True and side3.num_clusters == 5
    # the reused embeddings give exactly the dataset a build without the cache gives
    assert side2.fingerprint == side_plain.fingerprint
    assert np.array_equal(np.asarray(side2.assignments()), np.asarray(side_plain.assignments()))
    assert np.array_equal(np.asarray(side2.embeddings()), np.asarray(side_plain.embeddings()))
    assert np.array_equal(side2.centroids(), side_plain.centroids())


def test_other_texts_order_or_embedder_miss(tmp_path, docs):
    hashing = HashingEmbedder(seed=0).describe()
    texts = [d["text"] for d in docs]
    key = cache_key(hashing, [texts[:100], texts[100:]])
    assert key == cache_key(hashing, [texts])  # chunking does not matter
    assert key != cache_key(hashing, [texts[1:] + texts[:1]])  # order does
    assert key != cache_key(hashing, [texts[:-1] + [texts[-1] + " "]])
    assert key != cache_key(HashingEmbedder(seed=1).describe(), [texts])
    assert cache_key(hashing, [["ab", "c"]]) != cache_key(hashing, [["a", "bc"]])  # boundaries count
    # through the build: a changed document or another embedder seed embeds again
    cache = tmp_path / "cache"
    jsonl = _jsonl(tmp_path / "a.jsonl", docs)
    _build(tmp_path, "a", jsonl, cache, clusters=4)
    changed = [dict(d) for d in docs]
    changed[0]["text"] += " changed"
    jsonl_b = _jsonl(tmp_path / "b.jsonl", changed)
    _, side_b = _build(tmp_path, "b", jsonl_b, cache, clusters=4)
    _, side_c = _build(tmp_path, "c", jsonl, cache, clusters=4, seed=1)  # hashing seed follows --seed
    assert side_b.manifest["embed_cache"]["hit"] is False and side_c.manifest["embed_cache"]["hit"] is False
    assert len(list(cache.glob(f"*{SUFFIX}"))) == 3


@pytest.mark.parametrize("bad", ["garbage", "shape"])
def test_a_bad_cache_file_is_reported_and_replaced(tmp_path, docs, capsys, bad):
    jsonl = _jsonl(tmp_path / "in.jsonl", docs)
    cache = tmp_path / "cache"
    _, side = _build(tmp_path, "first", jsonl, cache, clusters=4)
    path = EmbeddingCache(cache).path(side.manifest["embed_cache"]["key"])
    if bad == "garbage":
        path.write_bytes(b"not an npy file")
    else:
        np.save(path, np.zeros((len(docs) - 1, 256), dtype=np.float16))
    capsys.readouterr()
    _, again = _build(tmp_path, "again", jsonl, cache, clusters=4)
    err = capsys.readouterr().err
    fault = again.manifest["embed_cache"]["fault"]
    assert again.manifest["embed_cache"]["hit"] is False and fault and path.name in fault
    assert "warning: embeddings cache" in err and path.name in err
    if bad == "shape":
        assert f"({len(docs) - 1}, 256)" in fault and f"({len(docs)}, 256)" in fault
    # embedded again and the file replaced: the next build hits, and the result is the same
    _, third = _build(tmp_path, "third", jsonl, cache, clusters=4)
    assert third.manifest["embed_cache"]["hit"] is True
    assert np.array_equal(np.asarray(third.embeddings()), np.asarray(side.embeddings()))


def test_cli_flag_and_refusals(tmp_path, docs, capsys):
    jsonl = _jsonl(tmp_path / "in.jsonl", docs)
    cache = tmp_path / "cache"
    for name in ("one", "two"):
        assert main(["shards", "build", str(jsonl), "--out", str(tmp_path / name), "--embedder", "hashing",
                     "--clusters", "3", "--embed-cache", str(cache), "--quiet"]) == 0
    assert Sidecar.open(tmp_path / "two").manifest["embed_cache"]["hit"] is True
    capsys.readouterr()
    assert main(["shards", "build", str(jsonl), "--out", str(tmp_path / "ray"), "--embedder", "hashing",
                 "--embed-cache", str(cache), "--engine", "ray", "--quiet"]) == 2
    assert "--embed-cache" in capsys.readouterr().err and not (tmp_path / "ray").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="--embed-cache must be a folder.*a-file"):
        build(BuildConfig(out=str(tmp_path / "f"), inputs=(str(jsonl),), embedder="hashing", progress=False,
                          embed_cache=str(a_file)))
