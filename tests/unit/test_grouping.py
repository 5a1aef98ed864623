"""`croupier shards build --group-by`: groups stay together (and apart) in their clusters, the
layout round-trips through the sidecar and `croupier simulate`, bad input is refused with the rule."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from croupier.cli import main
from croupier.errors import ConfigError, DatasetError
from croupier.format.sidecar import Sidecar
from croupier.shards.build.builder import BuildConfig, build
from croupier.shards.build.grouping import GROUPS_FILE, read_grouping
from croupier.shards.build.mds import MDSSource

# a long tail: one big source, a middle one, rare ones down to two documents
SIZES = {"python": 300, "rust": 80, "ocaml": 12, "forth": 4, "apl": 2}
WORDS = ["stream", "shard", "cluster", "batch", "token", "rank", "seed", "clip", "pass", "cursor",
         "layout", "sample", "epoch", "index", "server", "client", "offset", "member", "group", "field"]


def write_corpus(path: Path, seed: int = 3) -> list[dict]:
    rng = random.Random(seed)
    docs = []
    for src, n in SIZES.items():
        for i in range(n):
            docs.append({"text": f"{src} " + " ".join(rng.choice(WORDS) for _ in range(12)) + f" #{i}",
                         "source": src})
    rng.shuffle(docs)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("in") / "docs.jsonl"
    return path, write_corpus(path)


def build_cli(inputs: Path, out: Path, *extra: str) -> int:
    return main(["shards", "build", str(inputs), "--out", str(out), "--embedder", "hashing", "--quiet",
                 "--shard-size", "16KiB", *extra])


def sources_by_id(ds: Path, n: int) -> list[str]:
    with MDSSource(str(ds)) as src:
        return [str(v) for v in src.get(np.arange(n), "source")]


@pytest.mark.parametrize("layout", ["cluster-major", "original"])
def test_one_cluster_per_group_holds_exactly_that_group(tmp_path, corpus, layout):
    inputs, docs = corpus
    ds = tmp_path / "ds"
    assert build_cli(inputs, ds, "--group-by", "source", "--layout", layout) == 0
    side = Sidecar.open(ds)
    g = read_grouping(side)
    assert g is not None and g.field == "source" and g.names == sorted(SIZES)
    assert side.num_clusters == len(SIZES)
    assert side.manifest["columns"]["source"] == "str"  # the field is kept as a column
    truth = sources_by_id(ds, side.num_samples)
    clusters = np.asarray(side.assignments())
    for c in range(side.num_clusters):
        members = {truth[i] for i in np.flatnonzero(clusters == c)}
        assert members == {g.names[g.cluster_groups[c]]}
    sizes = {g.names[g.cluster_groups[c]]: int(side.sizes[c]) for c in range(side.num_clusters)}
    assert sizes == SIZES
    # the per-sample codes in the sidecar equal the records' own values, id by id
    assert [g.names[k] for k in np.asarray(g.codes())] == truth
    assert (ds / "croupier" / GROUPS_FILE).is_file()


def test_kmeans_inside_groups_is_group_major_and_deterministic(tmp_path, corpus):
    inputs, _ = corpus
    a, b = tmp_path / "a", tmp_path / "b"
    assert build_cli(inputs, a, "--group-by", "source", "--clusters-per-group", "3", "--seed", "5") == 0
    assert build_cli(inputs, b, "--group-by", "source", "--clusters-per-group", "3", "--seed", "5") == 0
    sa, sb = Sidecar.open(a), Sidecar.open(b)
    assert np.array_equal(np.asarray(sa.assignments()), np.asarray(sb.assignments()))
    assert sa.manifest["grouping"] == sb.manifest["grouping"]
    g = read_grouping(sa)
    cg = g.cluster_groups
    assert (np.diff(cg) >= 0).all(), "cluster ids are group-major"
    per_group = Counter(g.names[k] for k in cg.tolist())
    assert per_group == {name: min(3, n) for name, n in SIZES.items()}  # apl has only 2 documents
    truth = sources_by_id(a, sa.num_samples)
    clusters = np.asarray(sa.assignments())
    for c in range(sa.num_clusters):
        assert {truth[i] for i in np.flatnonzero(clusters == c)} == {g.names[cg[c]]}


def test_size_rule_gives_big_groups_more_clusters(tmp_path, corpus):
    inputs, _ = corpus
    ds = tmp_path / "ds"
    assert build_cli(inputs, ds, "--group-by", "source", "--cluster-size", "40") == 0
    g = read_grouping(Sidecar.open(ds))
    per_group = Counter(g.names[k] for k in g.cluster_groups.tolist())
    # one per 40 documents, rounded up: apl, forth, ocaml 1, rust (80) 2, python (300) 8
    assert per_group == {name: math.ceil(n / 40) for name, n in SIZES.items()}


def test_groups_round_trip_through_simulate(tmp_path, corpus, capsys):
    inputs, _ = corpus
    ds = tmp_path / "ds"
    assert build_cli(inputs, ds, "--group-by", "source") == 0
    side = Sidecar.open(ds)
    truth = sources_by_id(ds, side.num_samples)
    capsys.readouterr()
    assert main(["simulate", "--dataset", str(ds), "--policy", "uniform", "--global-batch", "20",
                 "--steps", "50", "--seed", "1", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    drawn = Counter(truth[i] for row in rows for i in row["indices"])
    assert sum(drawn.values()) == 1000
    # uniform over the groups' clusters: every source about a fifth of the draws, the 2-document one too
    for name in SIZES:
        assert 130 <= drawn[name] <= 270, drawn
    # random (shuffling) draws follow the natural sizes instead: the rare sources nearly vanish
    assert main(["simulate", "--dataset", str(ds), "--policy", "random", "--global-batch", "20",
                 "--steps", "50", "--seed", "1", "--format", "jsonl"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
    rand = Counter(truth[i] for row in rows for i in row["indices"])
    assert rand["apl"] + rand["forth"] < 40 and rand["python"] > 600


def test_old_sidecars_without_grouping_still_load(tmp_path, corpus, capsys):
    inputs, _ = corpus
    ds = tmp_path / "ds"
    assert build_cli(inputs, ds, "--clusters", "4", "--keep-fields", "source") == 0
    side = Sidecar.open(ds)
    assert "grouping" not in side.manifest and read_grouping(side) is None
    assert main(["shards", "inspect", str(ds)]) == 0
    assert "grouped by" not in capsys.readouterr().out


def test_inspect_shows_the_grouping(tmp_path, corpus, capsys):
    inputs, _ = corpus
    ds = tmp_path / "ds"
    assert build_cli(inputs, ds, "--group-by", "source", "--clusters-per-group", "2") == 0
    capsys.readouterr()
    assert main(["shards", "inspect", str(ds)]) == 0
    assert "grouped by   'source': 5 groups, 2 cluster(s) per group" in capsys.readouterr().out
    assert main(["shards", "inspect", str(ds), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["grouping"] == {"field": "source", "groups": 5, "rule": "2 cluster(s) per group"}
    assert summary["manifest"]["grouping"]["names"] == sorted(SIZES)


# -- refusals -------------------------------------------------------------------------------------------
def test_missing_field_is_refused_naming_the_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a b", "source": "x"}) + "\n" + json.dumps({"text": "c d"}) + "\n")
    with pytest.raises(DatasetError, match=r"docs.jsonl:2: missing kept field 'source'"):
        build(BuildConfig(out=str(tmp_path / "ds"), inputs=(str(path),), embedder="hashing", group_by="source",
                          progress=False))


def test_field_with_one_value_is_refused(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "source": "web"}) + "\n" for i in range(6)))
    with pytest.raises(ConfigError, match=r"--group-by 'source': the field has a single value \('web'\) "
                                          r"in all 6 documents; grouping needs at least 2 groups"):
        build(BuildConfig(out=str(tmp_path / "ds"), inputs=(str(path),), embedder="hashing", group_by="source",
                          progress=False))


def test_as_many_groups_as_documents_is_refused(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}", "url": f"u{i}"}) + "\n" for i in range(5)))
    with pytest.raises(ConfigError, match=r"--group-by 'url': 5 groups for 5 documents; groups must be fewer "
                                          r"than documents"):
        build(BuildConfig(out=str(tmp_path / "ds"), inputs=(str(path),), embedder="hashing", group_by="url",
                          progress=False))


@pytest.mark.parametrize("kwargs, message", [
    ({"group_by": "source", "clusters_per_group": 0}, "--clusters-per-group must be >= 1, got 0"),
    ({"group_by": "source", "cluster_size": -3}, "--cluster-size must be >= 1, got -3"),
    ({"group_by": "source", "clusters_per_group": 2, "cluster_size": 5}, "not both (got 2 and 5)"),
    ({"clusters_per_group": 2}, "--clusters-per-group, --cluster-size and --min-cluster-size need --group-by FIELD"),
    ({"min_cluster_size": 3}, "--clusters-per-group, --cluster-size and --min-cluster-size need --group-by FIELD"),
    ({"group_by": "source", "min_cluster_size": 3},
     "--min-cluster-size 3 folds small clusters of the k-means inside a group: give --clusters-per-group or "
     "--cluster-size with it"),
    ({"group_by": "source", "cluster_size": 10, "min_cluster_size": 0}, "--min-cluster-size must be >= 1, got 0"),
    ({"group_by": "source", "clusters": 8}, "--clusters 8 and --group-by are exclusive"),
    ({"group_by": "text"}, "--group-by 'text' must not be the text field"),
])
def test_bad_grouping_options_are_refused_with_the_rule(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BuildConfig(out=str(tmp_path / "ds"), inputs=("x.jsonl",), **kwargs)


def test_cli_refusal_exits_nonzero_with_the_rule(tmp_path, corpus, capsys):
    inputs, _ = corpus
    assert build_cli(inputs, tmp_path / "ds", "--group-by", "source", "--clusters-per-group", "0") == 2
    assert "--clusters-per-group must be >= 1, got 0" in capsys.readouterr().err


def test_merge_small_by_hand():
    from croupier.shards.build.grouping import merge_small

    # four clusters of sizes 6, 1, 2, 0 on the unit circle: 0 at 0 degrees, 1 at 80, 2 at 60, 3 at 90
    ang = np.radians([0.0, 80.0, 60.0, 90.0])
    cent = np.stack([np.cos(ang), np.sin(ang)], axis=1).astype(np.float32)
    labels = np.array([0] * 6 + [1] + [2, 2])
    new, c2 = merge_small(labels, cent, 3)
    # 1 (size 1, the smallest) folds into 2 (its nearest non-empty: 20 degrees against 80);
    # then 2 has 3 documents and nothing is under 3
    assert new.tolist() == [0] * 6 + [2, 2, 2]
    expect = 2 * cent[2] + cent[1]
    assert np.allclose(c2[2], expect / np.linalg.norm(expect), atol=1e-6) and np.allclose(c2[0], cent[0])
    # with 4: the merged cluster of 3 goes into 0, the only one left
    new, _ = merge_small(labels, cent, 4)
    assert new.tolist() == [0] * 9
    # a group whose every cluster is small ends as one cluster, never empty: 0 (the first of the
    # smallest) folds into 2 (60 degrees against 80), then 1 into 2, the only one left
    new, _ = merge_small(np.array([0, 1, 2]), cent[:3], 10)
    assert new.tolist() == [2, 2, 2]


def test_min_cluster_size_folds_small_clusters_inside_their_group_only(tmp_path, corpus):
    inputs, docs = corpus
    ds = tmp_path / "ds"
    assert build_cli(inputs, ds, "--group-by", "source", "--clusters-per-group", "6", "--min-cluster-size", "10") == 0
    side = Sidecar.open(ds)
    grouping = read_grouping(side)
    assert grouping is not None and grouping.min_cluster_size == 10
    assert "clusters under 10 documents folded into their group's nearest" in grouping.rule()
    sizes, srcs = side.sizes, sources_by_id(ds, len(docs))
    a = np.asarray(side.assignments())
    by_cluster: dict[int, set] = {}
    for c, s in zip(a.tolist(), srcs):
        by_cluster.setdefault(c, set()).add(s)
    assert all(len(v) == 1 for v in by_cluster.values())  # never across groups
    per_group = Counter(next(iter(v)) for v in by_cluster.values())
    for c, v in by_cluster.items():
        g = next(iter(v))
        # under 10 only where the whole group is (forth 4, apl 2)
        assert sizes[c] >= 10 or (SIZES[g] < 10 and per_group[g] == 1), (g, int(sizes[c]))
    assert per_group["apl"] == per_group["forth"] == 1 and per_group["ocaml"] == 1  # 12 docs: one cluster of 12
    assert sum(sizes) == len(docs) and 1 < per_group["python"] <= 6
    # without the fold, the fixed count cuts the small groups up
    plain = tmp_path / "plain"
    assert build_cli(inputs, plain, "--group-by", "source", "--clusters-per-group", "6") == 0
    plain_side = Sidecar.open(plain)
    assert plain_side.num_clusters == sum(min(6, n) for n in SIZES.values()) == 24
    assert plain_side.sizes.min() < 10 and side.num_clusters < 24
