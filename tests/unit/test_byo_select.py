"""Scores and filters the user has: `shards score --from-field/--from-file`, `shards select --by NAME
--keep/--threshold`, `--where EXPR` (the filter language) and `--within` (a filter, then a cut)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cases.shards_build import read_back
from croupier.cli import main
from croupier.errors import ConfigError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.synthetic import generate_corpus, write_jsonl
from croupier.shards.scoring.where import WhereError, evaluate, parse

N = 200
LANGS = ("en", "fr", "de", "it o'neil")


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """A dataset built without an embedder (clusters: the `lang` field), with numeric and string fields;
    the returned records are in sample-id order."""
    folder = tmp_path_factory.mktemp("byo-select")
    docs = generate_corpus(N, 4, seed=11)
    quality = np.random.default_rng(1).permutation(N) / N  # every value distinct: no ties
    for i, d in enumerate(docs):
        d.update(text=f"{i}: {d['text']}", lang=LANGS[i % 4], quality=float(quality[i]), year=2000 + i % 30,
                 uid=f"r{i}")
    write_jsonl(folder / "in.jsonl", docs)
    out = folder / "ds"
    assert main(["shards", "build", str(folder / "in.jsonl"), "--out", str(out), "--embedder", "none",
                 "--group-by", "lang", "--keep-fields", "quality,year,uid", "--quiet", "--no-tail-check"]) == 0
    samples = read_back(out, folder / "cache")
    return out, [docs[int(s["text"].split(":", 1)[0])] for s in samples]


def test_a_score_field_keeps_exactly_the_top_half(ds, capsys):
    out, recs = ds
    q = np.array([r["quality"] for r in recs], dtype=np.float32)
    assert main(["shards", "score", str(out), "--from-field", "quality"]) == 0
    side = Sidecar.open(out)
    np.testing.assert_array_equal(np.asarray(side.scores("quality")), q)
    assert side.score_params("quality") == {"scorer": "external", "from": "field", "field": "quality",
                                            "higher_is_better": True}
    assert main(["shards", "select", str(out), "--by", "quality", "--keep", "0.5", "--name", "top"]) == 0
    side.reload()
    assert np.array_equal(side.selection("top"), np.sort(np.argsort(-q)[:N // 2]))
    assert side.layout(selection="top").num_positions == N // 2
    # lower is better: the bottom half; a threshold keeps every sample at least as good
    assert main(["shards", "score", str(out), "--from-field", "quality", "--name", "loss", "--lower-is-better"]) == 0
    assert main(["shards", "select", str(out), "--by", "loss", "--keep", "0.25", "--name", "low"]) == 0
    assert main(["shards", "select", str(out), "--by", "quality", "--threshold", "0.9", "--name", "t"]) == 0
    side.reload()
    assert np.array_equal(side.selection("low"), np.sort(np.argsort(q)[:N // 4]))
    assert np.array_equal(side.selection("t"), np.flatnonzero(q >= np.float32(0.9)))
    assert "kept 20 of 200 samples" in capsys.readouterr().out


def test_a_score_file_with_its_hash_and_a_wrong_length_refused(ds, tmp_path, capsys):
    out, _ = ds
    values = np.arange(N, dtype=np.float64)[::-1].copy()
    np.save(tmp_path / "ppl.npy", values)
    assert main(["shards", "score", str(out), "--from-file", str(tmp_path / "ppl.npy"), "--lower-is-better"]) == 0
    side = Sidecar.open(out)
    assert side.score_params("ppl")["file"] == "ppl.npy" and len(side.score_params("ppl")["sha256"]) == 64
    assert main(["shards", "select", str(out), "--by", "ppl", "--keep", "0.1", "--name", "p10"]) == 0
    side.reload()
    assert side.selection("p10").tolist() == list(range(N - 20, N))
    np.save(tmp_path / "short.npy", values[:N - 1])
    assert main(["shards", "score", str(out), "--from-file", str(tmp_path / "short.npy")]) == 2
    assert f"holds {N - 1} scores but the dataset holds {N} samples" in capsys.readouterr().err
    assert main(["shards", "score", str(out), "--from-field", "lang"]) == 2
    err = capsys.readouterr().err
    assert "--from-field 'lang': sample 0 holds" in err and "(str), not a number" in err


def test_a_parquet_score_joined_on_a_kept_key(ds, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out, recs = ds
    # scores in input order (not the dataset's cluster order), rows shuffled on top: the key joins them
    rows = np.random.default_rng(3).permutation(N)
    uids = [f"r{i}" for i in rows]
    edu = [float(i % 7) + i / 1000 for i in rows]
    pq.write_table(pa.table({"id": uids, "edu": edu}), tmp_path / "edu.parquet")
    pq.write_table(pa.table({"uid": uids, "edu": edu}), tmp_path / "k.parquet")
    assert main(["shards", "score", str(out), "--from-file", str(tmp_path / "k.parquet"), "--column", "edu",
                 "--key", "uid"]) == 0
    side = Sidecar.open(out)
    want = np.array([float(int(r["uid"][1:]) % 7) + int(r["uid"][1:]) / 1000 for r in recs], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(side.scores("edu")), want)
    assert side.score_params("edu")["key"] == "uid" and side.score_params("edu")["column"] == "edu"
    pq.write_table(pa.table({"uid": uids[:-1], "edu": edu[:-1]}), tmp_path / "m.parquet")
    assert main(["shards", "score", str(out), "--from-file", str(tmp_path / "m.parquet"), "--column", "edu",
                 "--key", "uid"]) == 2
    assert f"has uid 'r{rows[-1]}', which the file does not hold" in capsys.readouterr().err
    pq.write_table(pa.table({"uid": uids + uids[:1], "edu": edu + edu[:1]}), tmp_path / "d.parquet")
    assert main(["shards", "score", str(out), "--from-file", str(tmp_path / "d.parquet"), "--column", "edu",
                 "--key", "uid"]) == 2
    assert f"key uid '{uids[0]}' appears twice (rows 0 and {N})" in capsys.readouterr().err
    assert main(["shards", "score", str(out), "--from-file", str(tmp_path / "edu.parquet"), "--column", "edu"]) == 0
    side.reload()
    np.testing.assert_array_equal(np.asarray(side.scores("edu")), np.asarray(edu, dtype=np.float32))


def test_where_keeps_exactly_the_matching_records(ds):
    out, recs = ds
    expr = "lang in ['en', \"it o'neil\"] and (year >= 2010 or quality < 0.25) and not year == 2020"
    assert main(["shards", "select", str(out), "--where", expr, "--name", "w"]) == 0
    want = [i for i, r in enumerate(recs) if r["lang"] in ("en", "it o'neil")
            and (r["year"] >= 2010 or r["quality"] < 0.25) and not r["year"] == 2020]
    side = Sidecar.open(out)
    assert side.selection("w").tolist() == want and 0 < len(want) < N
    assert side.selection_params("w")["where"] == expr
    assert side.layout(selection="w").num_positions == len(want)


def test_a_filter_then_a_quality_cut(ds):
    out, recs = ds
    assert main(["shards", "score", str(out), "--from-field", "quality"]) == 0
    assert main(["shards", "select", str(out), "--where", "lang == 'fr'", "--name", "fr"]) == 0
    assert main(["shards", "select", str(out), "--by", "quality", "--keep", "0.5", "--within", "fr",
                 "--name", "fr-top"]) == 0
    fr = [i for i, r in enumerate(recs) if r["lang"] == "fr"]
    best = sorted(sorted(fr, key=lambda i: -recs[i]["quality"])[:len(fr) // 2])
    side = Sidecar.open(out)
    assert side.selection("fr-top").tolist() == best
    # the same in one command: the filter applies first
    assert main(["shards", "select", str(out), "--where", "lang == 'fr'", "--by", "quality", "--keep", "0.5",
                 "--name", "fr-top2"]) == 0
    side.reload()
    assert side.selection("fr-top2").tolist() == best


@pytest.mark.parametrize(("expr", "pos", "why"), [
    ("lang = 'en'", 5, "unexpected '=' (equality is '==')"),
    ("year > 2000 and", 15, "expected a field, a number"),
    ("(year > 2000", 12, "expected ')'"),
    ("year >= 2000 ; drop", 13, "unexpected character ';'"),
    ("lang == 'en", 8, "unterminated string"),
    ("__import__('os')", 10, "expected 'and', 'or' or the end"),
    ("quality > 'high'", 8, "field 'quality' holds number values, compared with the string 'high'"),
    ("colour == 'red'", 0, "unknown field 'colour'"),
])
def test_an_expression_outside_the_language_is_refused_with_its_position(ds, capsys, expr, pos, why):
    out, _ = ds
    assert main(["shards", "select", str(out), "--where", expr, "--name", "bad"]) == 2
    err = capsys.readouterr().err
    assert why in err and err.rstrip().endswith(f"at position {pos}") and len(err.strip().splitlines()) == 1


def test_the_language_itself():
    cols = {"a": [1, 2, 3, None], "s": ["x", "y", 'q"z', "x"], "b": [True, False, True, False]}
    assert evaluate("a >= 2", cols, 4).tolist() == [False, True, True, False]
    assert evaluate("a == null or s == 'q\"z'", cols, 4).tolist() == [False, False, True, True]
    assert evaluate("b and not s in ['x']", cols, 4).tolist() == [False, False, True, False]
    assert evaluate("s not in []", cols, 4).tolist() == [True] * 4
    assert evaluate("-1.5e0 < a", cols, 4).tolist() == [True, True, True, False]
    with pytest.raises(WhereError, match="empty expression at position 0"):
        parse("   ")
    with pytest.raises(WhereError, match=r"expected '\[' after 'in', got '1' at position 5"):
        parse("a in 1")


def test_select_settings_that_do_not_hold_together(ds):
    out, _ = ds
    side = Sidecar.open(out)
    from croupier.shards.scoring.subset import select_subset

    with pytest.raises(ConfigError, match="needs one of --keep FRACTION or --threshold VALUE"):
        select_subset(side, "quality", None)
    with pytest.raises(ConfigError, match="a --where filter needs --name NAME"):
        select_subset(side, None, None, where="year > 1")
    with pytest.raises(ConfigError, match="no sample matches --where 'year > 3000'"):
        select_subset(side, None, None, where="year > 3000", name="none")
