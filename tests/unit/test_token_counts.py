"""Per-sample token counts in the cluster sidecar: recorded by `shards build --tokenizer`, added
by `shards tokens`, shown by `shards inspect`; real MDS shards, a real Hugging Face tokenizer
saved offline by the test session, and the sampler's sequence checked unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_shards_build import _token_mds

from cases.shards_build import read_back
from croupier.cli import main
from croupier.errors import DatasetError
from croupier.format.sidecar import Sidecar
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.shards.build.synthetic import generate_corpus, write_jsonl


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "in.jsonl"
    docs = generate_corpus(400, 6, seed=3)
    for i, d in enumerate(docs):
        d["score"] = float(i) / 7
    write_jsonl(path, docs)
    return path


def _tokens_of_texts(tokenizer: Path, texts: list[str]) -> np.ndarray:
    from croupier.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tokenizer))
    return np.array([len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts])


def _sequence(side: Sidecar, steps: int = 12) -> list[np.ndarray]:
    s = Sampler(side.layout(), PolicyConfig(policy="clusterclip", clip=2), 16, seed=9)
    return [s.next_batch() for _ in range(steps)]


@pytest.mark.parametrize("layout", ["cluster-major", "original"])
def test_build_with_a_tokenizer_records_each_samples_token_count(tmp_path, corpus_file, tiny_tokenizer, layout,
                                                                  capsys):
    out = tmp_path / "ds"
    assert main(["shards", "build", str(corpus_file), "--out", str(out), "--embedder", "hashing", "--clusters", "6",
                 "--layout", layout, "--tokenizer", str(tiny_tokenizer), "--chunk", "150", "--quiet"]) == 0
    side = Sidecar.open(out)
    counts = side.token_counts()
    assert counts is not None and counts.dtype == np.int32 and len(counts) == side.num_samples
    samples = read_back(out, tmp_path / "cache")
    np.testing.assert_array_equal(counts, [len(s["tokens"]) for s in samples])
    np.testing.assert_array_equal(counts, _tokens_of_texts(tiny_tokenizer, [s["text"] for s in samples]))
    entry = side.manifest["token_counts"]
    assert entry["file"] == "token_counts.npy" and entry["total"] == int(counts.sum())
    assert entry["tokenizer"] == str(tiny_tokenizer) and entry["field"] == "tokens"
    # inspect: total and per-cluster figures
    capsys.readouterr()
    assert main(["shards", "inspect", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["tokens"]
    per_cluster = np.bincount(np.asarray(side.assignments()), weights=counts, minlength=side.num_clusters)
    assert got["total"] == int(counts.sum())
    assert got["per_cluster"] == {"mean": float(per_cluster.mean()), "min": int(per_cluster.min()),
                                  "max": int(per_cluster.max())}
    assert main(["shards", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"tokens       {int(counts.sum())}" in text and "per cluster  mean" in text


def test_tokens_command_adds_counts_and_moves_no_fingerprint_or_sequence(tmp_path, corpus_file, tiny_tokenizer,
                                                                         capsys):
    out = tmp_path / "ds"
    assert main(["shards", "build", str(corpus_file), "--out", str(out), "--embedder", "hashing", "--clusters", "6",
                 "--keep-fields", "score", "--quiet"]) == 0
    before = Sidecar.open(out)
    assert before.token_counts() is None
    capsys.readouterr()
    assert main(["shards", "inspect", str(out)]) == 0
    assert "not counted" in capsys.readouterr().out
    fp, layout_fp, seq = before.fingerprint, before.layout().fingerprint, _sequence(before)
    manifest = dict(before.manifest)
    index = (out / "index.json").read_bytes()

    assert main(["shards", "tokens", str(out), "--tokenizer", str(tiny_tokenizer), "--quiet"]) == 0
    assert "tokens in 400 samples" in capsys.readouterr().out
    after = Sidecar.open(out)
    counts = after.token_counts()
    samples = read_back(out, tmp_path / "cache")
    np.testing.assert_array_equal(counts, _tokens_of_texts(tiny_tokenizer, [s["text"] for s in samples]))
    # Nothing the sampler binds to moved: the index, the fingerprints, the sequence.
    assert (out / "index.json").read_bytes() == index
    assert after.fingerprint == fp and after.layout().fingerprint == layout_fp
    replay = _sequence(after)
    assert len(replay) == len(seq) == 12
    for a, b in zip(replay, seq):
        np.testing.assert_array_equal(a, b)
    assert {k: v for k, v in after.manifest.items() if k != "token_counts"} == manifest
    assert not list((out / "croupier").glob("*.tmp")) and not list((out / "croupier").glob(".*.tmp"))


def test_tokens_command_counts_a_token_column_and_refuses_bad_input(tmp_path, corpus_file, tiny_tokenizer, capsys):
    out = tmp_path / "ds"
    assert main(["shards", "build", str(corpus_file), "--out", str(out), "--embedder", "hashing", "--clusters", "4",
                 "--keep-fields", "score", "--tokenizer", str(tiny_tokenizer), "--quiet"]) == 0
    built = np.array(Sidecar.open(out).token_counts())
    (out / "croupier" / "token_counts.npy").unlink()
    m = json.loads((out / "croupier" / "manifest.json").read_text())
    del m["token_counts"]
    (out / "croupier" / "manifest.json").write_text(json.dumps(m))
    assert main(["shards", "tokens", str(out), "--token-field", "tokens", "--quiet"]) == 0
    np.testing.assert_array_equal(Sidecar.open(out).token_counts(), built)
    capsys.readouterr()
    # a tokenizer that cannot load offline, named
    assert main(["shards", "tokens", str(out), "--tokenizer", str(tmp_path / "no-such-tokenizer"), "--quiet"]) == 2
    assert "no-such-tokenizer" in capsys.readouterr().err
    # a token column of the wrong type, named with its encoding
    assert main(["shards", "tokens", str(out), "--token-field", "score", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'score'" in err and "float64" in err
    assert main(["shards", "tokens", str(out), "--token-field", "text", "--quiet"]) == 2
    assert "'text'" in capsys.readouterr().err
    assert main(["shards", "tokens", str(out), "--token-field", "nope", "--quiet"]) == 2
    assert "'nope'" in capsys.readouterr().err
    # text without a tokenizer
    assert main(["shards", "tokens", str(out), "--quiet"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    np.testing.assert_array_equal(Sidecar.open(out).token_counts(), built)  # refusals wrote nothing


def test_adopting_a_token_column_dataset_counts_its_tokens(tmp_path, tiny_tokenizer, capsys):
    from croupier.tokenizer import load_tokenizer

    tok = load_tokenizer(str(tiny_tokenizer))
    docs = generate_corpus(120, 3, seed=1)
    rows = [np.asarray(tok(d["text"], add_special_tokens=False)["input_ids"], np.int64) for d in docs]
    src = tmp_path / "tokens"
    _token_mds(src, rows, "bytes")
    assert main(["shards", "build", "--adopt", str(src), "--embedder", "hashing", "--clusters", "3",
                 "--tokenizer", str(tiny_tokenizer), "--quiet"]) == 0
    np.testing.assert_array_equal(Sidecar.open(src).token_counts(), [len(r) for r in rows])
    # a float column in the same place is refused by value, naming the column and sample
    bad = tmp_path / "floats"
    _token_mds(bad, [r.astype(np.float32) for r in rows[:10]], "ndarray")
    capsys.readouterr()
    assert main(["shards", "build", "--adopt", str(bad), "--embedder", "hashing", "--clusters", "2",
                 "--tokenizer", str(tiny_tokenizer), "--quiet"]) == 2
    assert f"token column of sample 0 of {bad} holds float32, not integer token ids" in capsys.readouterr().err


def test_token_counts_of_a_sidecar_must_match_its_samples(tmp_path, corpus_file, tiny_tokenizer):
    out = tmp_path / "ds"
    assert main(["shards", "build", str(corpus_file), "--out", str(out), "--embedder", "hashing", "--clusters", "4",
                 "--quiet"]) == 0
    side = Sidecar.open(out)
    from croupier.errors import ConfigError

    with pytest.raises(ConfigError, match="one value per sample"):
        side.write_token_counts(np.ones(3, np.int32), {})
    with pytest.raises(ConfigError, match="integers"):
        side.write_token_counts(np.ones(side.num_samples, np.float32), {})
    np.save(out / "croupier" / "token_counts.npy", np.ones(5, np.int32))
    m = json.loads((out / "croupier" / "manifest.json").read_text())
    m["token_counts"] = {"file": "token_counts.npy", "dtype": "int32", "length": 5, "total": 5}
    (out / "croupier" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="token_counts.npy"):
        Sidecar.open(out).token_counts()
