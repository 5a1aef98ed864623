"""`croupier shards inspect` shows where embeddings, clusters and scores came from, and every score's
quantiles; `croupier shards plot --score NAME` draws a score's histogram."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from croupier.cli import main
from croupier.shards.build.synthetic import generate_corpus, write_jsonl


def test_inspect_shows_provenance_and_score_quantiles(tmp_path, capsys):
    docs = generate_corpus(101, 3, seed=2)
    for i, d in enumerate(docs):
        d["grade"] = float(i)  # quantiles of 0..100 are the quantile itself times 100
    write_jsonl(tmp_path / "in.jsonl", docs)
    emb = np.random.default_rng(0).standard_normal((101, 4)).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    sha = hashlib.sha256((tmp_path / "emb.npy").read_bytes()).hexdigest()
    out = tmp_path / "ds"
    assert main(["shards", "build", str(tmp_path / "in.jsonl"), "--out", str(out), "--embeddings",
                 str(tmp_path / "emb.npy"), "--group-by", "topic", "--keep-fields", "grade", "--quiet",
                 "--no-tail-check"]) == 0
    assert main(["shards", "score", str(out), "--from-field", "grade", "--lower-is-better"]) == 0
    capsys.readouterr()
    assert main(["shards", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"embeddings   given: file emb.npy (sha256 {sha[:12]}, dtype float32, rows 101)" in text
    assert "clusters by  the field 'topic', one cluster per value" in text
    assert ("  grade      field 'grade', lower is better: min 0  q10 10  q25 25  median 50  q75 75  q90 90  max 100"
            "  mean 50") in text
    assert main(["shards", "inspect", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["provenance"]["embeddings"]["sha256"] == sha
    assert got["score_stats"]["grade"]["quantiles"]["q25"] == 25.0
    assert got["score_stats"]["grade"]["higher_is_better"] is False
    assert main(["shards", "plot", str(out), "--score", "grade", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
