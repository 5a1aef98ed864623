"""The natural docstring corpus is deterministic and refuses bad settings; the training
comparison's natural mode runs end to end through `croupier shards build` and a real server."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.common import natural_corpus as nc
from bench.studies import train_natural

WORDS = ("parse", "render", "merge", "split", "encode", "decode", "fetch", "store", "index", "count")


def _package(site: Path, name: str, docs: int) -> None:
    """A package of `docs` functions with distinct docstrings, spread over two files."""
    pkg = site / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'"""The {name} package: helpers that {WORDS[len(name) % 10]} things."""\n')
    for i in range(docs - 1):
        target = pkg / "sub" / "impl.py" if i % 2 else pkg / "__init__.py"
        with open(target, "a") as f:
            f.write(f'def f{i}():\n    """{WORDS[i % 10].title()} the {name} record number {i} and return it."""\n')
    (pkg / "sub" / "__init__.py").touch()


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    site = tmp_path / "site-packages"
    site.mkdir()
    for name, docs in (("alpha", 40), ("beta", 20), ("gamma", 12), ("delta", 8), ("eps", 4)):
        _package(site, name, docs)
    (site / "tiny.py").write_text('"""A lone module with a single docstring, too few to keep."""\n')
    (site / "broken").mkdir()
    (site / "broken" / "__init__.py").write_text("def oops(:\n    '''never parsed, not even close'''\n")
    (site / "alpha-1.0.dist-info").mkdir()
    (site / "alpha-1.0.dist-info" / "x.py").write_text('"""Metadata folders are not packages at all."""\n')
    (site / "alpha" / "__pycache__").mkdir()
    (site / "alpha" / "__pycache__" / "y.py").write_text('"""Caches are skipped by the walk entirely."""\n')
    (site / "__editable__finder.py").write_text('"""Editable finders are not packages either."""\n')
    return site


def test_collect_reads_docstrings_per_package_deterministically(site):
    cfg = nc.CorpusConfig(site_packages=str(site), min_docs=4)
    docs = nc.collect(cfg)
    assert docs == nc.collect(cfg)
    sizes = nc.source_sizes(docs)
    # every package docstring counted (module + functions); the one-docstring module, the broken
    # package, metadata, caches and editable finders give nothing
    assert sizes == {"alpha": 40, "beta": 20, "gamma": 12, "delta": 8, "eps": 4}
    assert all(len(d["text"]) >= cfg.min_chars and set(d) == {"text", "source"} for d in docs)
    assert len({d["text"] for d in docs}) == len(docs)
    # keeping a fraction is per package (ceil), capped, seeded by (seed, package)
    part = nc.collect(nc.CorpusConfig(site_packages=str(site), fraction=0.5, max_docs=15, min_docs=4))
    assert nc.source_sizes(part) == {"alpha": 15, "beta": 10, "gamma": 6, "delta": 4}
    other = nc.collect(nc.CorpusConfig(site_packages=str(site), fraction=0.5, max_docs=15, min_docs=4, seed=1))
    assert nc.source_sizes(other) == nc.source_sizes(part) and other != part
    full_alpha = {d["text"] for d in docs if d["source"] == "alpha"}
    assert {d["text"] for d in part if d["source"] == "alpha"} <= full_alpha


def test_duplicates_are_kept_once_and_file_cap_spreads(site, tmp_path):
    (site / "zeta").mkdir()
    (site / "zeta" / "__init__.py").write_text(
        "".join(f'def g{i}():\n    """{WORDS[i % 10].title()} the alpha record number {i} and return it."""\n'
                for i in range(35, 45)))
    sizes = nc.source_sizes(nc.collect(nc.CorpusConfig(site_packages=str(site), min_docs=5)))
    # zeta's first four docstrings are alpha's (alpha comes first in sorted order): only the others stay
    assert sizes["zeta"] == 6 and sizes["alpha"] == 40
    files = [Path(f"f{i}.py") for i in range(10)]
    assert nc.spread(files, 3) == [files[0], files[4], files[9]]
    assert nc.spread(files, 20) == files


def test_split_holds_out_per_source_and_keeps_small_sources_whole(site):
    docs = nc.collect(nc.CorpusConfig(site_packages=str(site), min_docs=4))
    train, held = nc.split(docs)
    assert (train, held) == nc.split(docs)
    assert len(train) + len(held) == len(docs)
    tr, he = nc.source_sizes(train), nc.source_sizes(held)
    assert he == {"alpha": 8, "beta": 4, "gamma": 2, "delta": 2}  # 20%, at least 2
    assert tr["eps"] == 4 and "eps" not in he  # 4 - 2 < 3 training documents: not split
    assert not ({d["text"] for d in train} & {d["text"] for d in held})


def test_bad_settings_and_inputs_are_refused(site, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such"):
        nc.collect(nc.CorpusConfig(site_packages=str(tmp_path / "no-such")))
    with pytest.raises(ValueError, match="fraction must be in"):
        nc.CorpusConfig(site_packages=str(site), fraction=0.0)
    with pytest.raises(ValueError, match="max_docs must be >= 1, got 0"):
        nc.CorpusConfig(site_packages=str(site), max_docs=0)
    with pytest.raises(ValueError, match="min_docs .* must not exceed max_docs"):
        nc.CorpusConfig(site_packages=str(site), min_docs=10, max_docs=5)
    with pytest.raises(ValueError, match="needs at least 2"):
        nc.collect(nc.CorpusConfig(site_packages=str(site), min_docs=30))
    with pytest.raises(ValueError, match="heldout_fraction"):
        nc.split([{"text": "x", "source": "a"}], heldout_fraction=1.0)


def test_assemble_writes_the_split(site, tmp_path):
    train, held = nc.assemble(tmp_path / "corpus", nc.CorpusConfig(site_packages=str(site)))
    meta = json.loads((tmp_path / "corpus" / "sources.json").read_text())
    assert meta["train"] == nc.source_sizes(nc.read_jsonl(train))
    assert sum(meta["heldout"].values()) == len(nc.read_jsonl(held)) == 16


@pytest.mark.slow
def test_natural_mode_runs_end_to_end(site, tmp_path):
    results, info = train_natural.compare_natural("tiny", tmp_path / "out", site_packages=site,
                                                  builds=["kmeans", "source"], max_docs=20, min_docs=4)
    assert [(v["build"], v["sampler"]) for v in info["variants"]] == [
        ("kmeans", "random"), ("kmeans", "uniform"), ("kmeans", "clusterclip auto"),
        ("source", "uniform"), ("source", "clusterclip auto")]
    assert info["sources"] == ["alpha", "beta", "delta", "eps", "gamma"]
    # one cluster per source with --group-by: the clusters are the sources exactly
    assert info["builds"]["source"]["clusters"] == 5 and info["builds"]["source"]["nmi"] == pytest.approx(1.0)
    assert info["builds"]["kmeans"]["clusters"] == round(math.sqrt(info["train_docs"]))
    # one embeddings cache per run: the first build embeds, the second reuses its embeddings
    assert not info["builds"]["kmeans"]["embeddings_reused"] and info["builds"]["source"]["embeddings_reused"]
    by = {(b["build"], b["sampler"]): r for b, r in zip(info["variants"], results)}
    for r in results:
        assert r.examples == info["steps"] * info["params"]["batch"] == len(r.ids)
        assert all(math.isfinite(r.metrics[k]) for k in ("mean", "rare25", "common25", "rare_share"))
    # balancing the true sources deals the rarest quarter more than its natural share
    assert by[("source", "uniform")].metrics["rare_share"] > by[("kmeans", "random")].metrics["rare_share"]
    assert by[("source", "clusterclip auto")].clip is not None
    table = (tmp_path / "out" / "table.txt").read_text()
    assert "beats random" in table and "clusterclip auto" in table
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(saved["results"]) == len(results) and saved["builds"]["source"]["drowned"] == 0
    held = np.asarray(saved["results"][0]["heldout_per_source"], dtype=float)
    assert np.isfinite(held[[0, 1, 2, 4]]).all() and np.isnan(held[3])  # eps is not split: not evaluated


def test_build_settings_and_paired_tables():
    from bench.studies.harness import RunResult

    assert train_natural.BuildSetting("k", k_factor=4.0).cli_args(100) == ["--clusters", "40"]
    assert train_natural.BuildSetting("k", k_factor=4.0).cli_args(9) == ["--clusters", "9"]  # at most N
    assert train_natural.BuildSetting("s", ("--group-by", "source")).cli_args(100) == ["--group-by", "source"]
    names = [(v.build, v.name, v.policy.get("clip")) for v in train_natural.natural_variants(
        [train_natural.BuildSetting("a"), train_natural.BuildSetting("b")], 100, clips=(4,))]
    assert names == [("a", "random", None), ("a", "uniform", None), ("a", "clusterclip auto", None),
                     ("a", "clusterclip 4", 4), ("b", "uniform", None), ("b", "clusterclip auto", None),
                     ("b", "clusterclip 4", 4)]
    with pytest.raises(ValueError, match=r"unknown build\(s\) \['nope'\]; valid: \['kmeans', 'kmeans-4x'"):
        train_natural.compare_natural("tiny", builds=["nope"])

    def run(name: str, seed: int, mean: float, rare: float) -> RunResult:
        r = RunResult(name=name, policy={}, steps=1, examples=1, train_s=0.0, heldout_per_cluster=np.zeros(1),
                      train_per_cluster=np.zeros(1), draws=np.zeros(1), clip=3 if name != "random" else None,
                      final_train_loss=0.0, seed=seed)
        r.metrics = {"mean": mean, "rare25": rare, "common25": mean, "rare_share": 0.1}
        return r

    # seed-major, as compare_natural runs them: random beats the row in seed 1 only
    results = [run("random", 0, 2.0, 2.0), run("clusterclip auto", 0, 1.9, 1.8),
               run("random", 1, 1.5, 1.5), run("clusterclip auto", 1, 1.6, 1.4)]
    info = {"params": {"seeds": [0, 1]},
            "variants": [{"build": "kmeans", "sampler": "random", "policy": {}},
                         {"build": "kmeans", "sampler": "clusterclip auto", "policy": {}}],
            "builds": {"kmeans": {"clusters": 7, "nmi": 0.5, "drowned": 2}}}
    rows, base = train_natural._rows(results, info)
    assert train_natural.paired(rows[("kmeans", "clusterclip auto")], base, "mean") == (pytest.approx(0.0), 1, 2)
    assert train_natural.paired(rows[("kmeans", "clusterclip auto")], base, "rare25") == (pytest.approx(-0.15), 2, 2)
    table = train_natural.format_natural(results, info).splitlines()
    assert "+0.0000" in table[3] and "-0.1500" in table[3] and "1/2, 2/2" in table[3]
    per_seed = train_natural.format_per_seed(results, info)
    assert "2.0000 / 1.5000" in per_seed and "1.8000 / 1.4000" in per_seed
