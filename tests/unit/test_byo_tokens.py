"""Tokenized corpora as build inputs: a Megatron indexed dataset (.bin + .idx, written here from the
format's documented layout) and OLMo-style .npy token arrays become samples whose token column equals
the original documents, with their token counts in the sidecar."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from cases.shards_build import read_back
from croupier.cli import main
from croupier.errors import ConfigError, DatasetError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.token_corpus import MegatronCorpus, OlmoCorpus

EOS = 0


def write_megatron(prefix: Path, docs: list[list[np.ndarray]], dtype: type, code: int, reverse: bool = False) -> None:
    """A Megatron `MMapIndexedDataset`: documents of one or more sequences. The index is the magic
    b"MMIDIDX\\x00\\x00", version <Q 1, dtype code <B, <Q sequences, <Q doc_idx entries, then int32
    sizes, int64 byte pointers into the .bin and int64 doc_idx (first sequence of every document, then
    the sequence count). `reverse` stores the sequences backwards in the .bin (the pointers say where)."""
    seqs = [s for d in docs for s in d]
    sizes = np.array([len(s) for s in seqs], dtype="<i4")
    order = list(range(len(seqs)))[::-1] if reverse else list(range(len(seqs)))
    pointers = np.zeros(len(seqs), dtype="<i8")
    blob = b""
    for i in order:
        pointers[i] = len(blob)
        blob += np.asarray(seqs[i], dtype=dtype).tobytes()
    doc_idx = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype("<i8")
    prefix.with_suffix(".bin").write_bytes(blob)
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code) + \
        struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx))
    prefix.with_suffix(".idx").write_bytes(header + sizes.tobytes() + pointers.tobytes() + doc_idx.tobytes())


def _docs(n: int, seed: int, vocab: int = 50_000) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(1, 40))) for _ in range(n)]


def _tokens(samples: list[dict]) -> list[list[int]]:
    return [np.asarray(s["tokens"]).tolist() for s in samples]


def test_a_megatron_dataset_adopts_to_samples_with_the_original_tokens(tmp_path):
    docs = _docs(150, 1)
    # documents of two sequences each (doc_idx steps by 2), stored backwards in the .bin
    write_megatron(tmp_path / "corpus", [[d[:len(d) // 2], d[len(d) // 2:]] for d in docs], np.uint16, 8,
                   reverse=True)
    corpus = MegatronCorpus(tmp_path / "corpus.idx")
    assert len(corpus) == 150 and [corpus.doc(i).tolist() for i in (0, 149)] == [docs[0].tolist(), docs[149].tolist()]
    np.save(tmp_path / "emb.npy", np.random.default_rng(2).standard_normal((150, 8)).astype(np.float32))
    res = build(BuildConfig(out=str(tmp_path / "ds"), inputs=(str(tmp_path / "corpus.idx"),), layout="original",
                            embeddings=str(tmp_path / "emb.npy"), clusters=4, progress=False))
    side = Sidecar.open(res.out)
    samples = read_back(Path(res.out), tmp_path / "cache")
    assert set(samples[0]) == {"tokens"} and side.manifest["columns"] == {"tokens": "ndarray:int32"}
    assert _tokens(samples) == [d.tolist() for d in docs]
    counts = side.token_counts()
    assert counts is not None and counts.tolist() == [len(d) for d in docs]
    params = side.token_counts_params()
    assert params is not None and params["from"] == "token corpus" and params["total"] == sum(map(len, docs))
    assert params["corpora"][0]["kind"] == "megatron" and params["corpora"][0]["sequences"] == 300


def test_olmo_npy_arrays_split_at_eos_cluster_major(tmp_path):
    docs = [np.append(d, EOS) for d in _docs(120, 3)]
    flat = np.concatenate(docs)
    np.save(tmp_path / "a.npy", flat[:len(np.concatenate(docs[:70]))].astype(np.uint32))
    # the second file as OLMo writes it: raw uint16 ids, no header, the last document without its EOS
    tail = np.concatenate(docs[70:])[:-1]
    tail.astype(np.uint16).tofile(tmp_path / "b.npy")
    assert len(OlmoCorpus(tmp_path / "b.npy", EOS)) == 50
    want = [d.tolist() for d in docs[:-1]] + [docs[-1][:-1].tolist()]
    vectors = np.random.default_rng(4).standard_normal((120, 6)).astype(np.float32)
    np.save(tmp_path / "emb.npy", vectors)
    rc = main(["shards", "build", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--eos-id", str(EOS),
               "--embeddings", str(tmp_path / "emb.npy"), "--clusters", "5", "--out", str(tmp_path / "ds"),
               "--shard-size", "4KiB", "--quiet"])
    assert rc == 0
    side = Sidecar.open(tmp_path / "ds")
    got = _tokens(read_back(tmp_path / "ds", tmp_path / "cache"))
    assert sorted(got) == sorted(want)  # every document once, in the cluster order
    # the embeddings follow the samples: sample i's vector is its document's
    pos = [want.index(t) for t in got]
    np.testing.assert_array_equal(np.asarray(side.embeddings()), vectors[pos].astype(np.float16))
    assert np.asarray(side.token_counts()).tolist() == [len(t) for t in got]
    assert [c["format"] for c in side.manifest["token_corpora"]] == ["npy", "raw"]


def test_token_corpus_settings_refused(tmp_path):
    write_megatron(tmp_path / "c", [[np.arange(1, 5)]], np.int32, 4)
    np.save(tmp_path / "t.npy", np.arange(10))
    (tmp_path / "x.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(ConfigError, match="needs --eos-id N"):
        BuildConfig(out=str(tmp_path / "o"), inputs=(str(tmp_path / "t.npy"),), embeddings="e.npy")
    with pytest.raises(ConfigError, match="do not mix in one build"):
        BuildConfig(out=str(tmp_path / "o"), inputs=(str(tmp_path / "c.idx"), str(tmp_path / "x.jsonl")),
                    embeddings="e.npy")
    with pytest.raises(ConfigError, match="a token corpus has no text to embed"):
        BuildConfig(out=str(tmp_path / "o"), inputs=(str(tmp_path / "c.idx"),))
    with pytest.raises(ConfigError, match="token corpora have no fields"):
        BuildConfig(out=str(tmp_path / "o"), inputs=(str(tmp_path / "c.idx"),), embeddings="e.npy", group_by="x")
    (tmp_path / "c.bin").unlink()
    with pytest.raises(DatasetError, match="c.bin is missing"):
        MegatronCorpus(tmp_path / "c.idx")
    (tmp_path / "bad.idx").write_bytes(b"NOTMEGATRON" + bytes(40))
    (tmp_path / "bad.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match="not a Megatron index"):
        MegatronCorpus(tmp_path / "bad.idx")


def test_a_token_corpus_embedded_by_decoding_with_a_tokenizer(tmp_path):
    from croupier.shards.build.embed import HashingEmbedder, minilm_model_path
    from croupier.tokenizer import load_tokenizer

    docs = _docs(40, 5, vocab=30_000)  # ids inside the MiniLM package's BERT vocabulary
    write_megatron(tmp_path / "c", [[d] for d in docs], np.int32, 4)
    res = build(BuildConfig(out=str(tmp_path / "ds"), inputs=(str(tmp_path / "c.idx"),), layout="original",
                            tokenizer=minilm_model_path(), embedder="hashing", clusters=3, progress=False))
    side = Sidecar.open(res.out)
    texts = load_tokenizer(minilm_model_path()).batch_decode([d.tolist() for d in docs], skip_special_tokens=True)
    np.testing.assert_array_equal(np.asarray(side.embeddings()), HashingEmbedder().encode(texts).astype(np.float16))
    assert _tokens(read_back(Path(res.out), tmp_path / "cache")) == [d.tolist() for d in docs]
    assert side.manifest["embedder"]["name"] == "hashing"
