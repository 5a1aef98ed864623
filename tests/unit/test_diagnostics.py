"""Long-tail diagnostics: NMI and purity against hand computation on a planted example, Gini,
and `croupier shards inspect --by` warning when a k-means clustering drowns rare groups."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from croupier.cli import main
from croupier.errors import ConfigError
from croupier.shards.diagnostics import format_report, gini, long_tail_report, nmi, size_stats

# planted: 10 samples, 3 clusters, 3 groups
#   cluster 0: a a a a b      cluster 1: b b c      cluster 2: a c
CLUSTERS = np.array([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
GROUPS = np.array([0, 0, 0, 0, 1, 1, 1, 2, 0, 2])
NAMES = ["a", "b", "c"]


def hand_nmi() -> float:
    n = 10
    table = {(0, 0): 4, (0, 1): 1, (1, 1): 2, (1, 2): 1, (2, 0): 1, (2, 2): 1}
    rows = {0: 5, 1: 3, 2: 2}  # cluster sizes
    cols = {0: 5, 1: 3, 2: 2}  # group sizes
    mi = sum(v / n * math.log(n * v / (rows[c] * cols[g])) for (c, g), v in table.items())
    h = -sum(s / n * math.log(s / n) for s in rows.values())
    return mi / ((h + h) / 2)


def test_nmi_equals_hand_computation_and_sklearn():
    assert nmi(CLUSTERS, GROUPS) == pytest.approx(hand_nmi(), abs=1e-12)
    assert nmi(CLUSTERS, GROUPS) == pytest.approx(normalized_mutual_info_score(GROUPS, CLUSTERS), abs=1e-12)
    assert nmi(GROUPS, GROUPS) == pytest.approx(1.0)
    assert nmi(np.zeros(5, int), np.zeros(5, int)) == 1.0
    assert nmi(np.zeros(4, int), np.array([0, 1, 0, 1])) == 0.0


def test_purity_main_cluster_and_drowned_groups_by_hand():
    rep = long_tail_report(CLUSTERS, GROUPS, NAMES, "source", drown=0.4)
    by = {g.name: g for g in rep.groups}
    # a: 4 of its 5 in cluster 0, which has 5 members -> purity 4/5
    assert (by["a"].main_cluster, by["a"].purity, by["a"].share_in_main, by["a"].clusters) == (0, 0.8, 0.8, 2)
    # b: 2 of its 3 in cluster 1 (size 3) -> purity 2/3
    assert (by["b"].main_cluster, by["b"].purity, by["b"].share_in_main) == (1, pytest.approx(2 / 3),
                                                                             pytest.approx(2 / 3))
    # c: one in cluster 1 (size 3) and one in cluster 2 (size 2): tie -> the smaller cluster id, 1/3
    assert (by["c"].main_cluster, by["c"].purity, by["c"].share_in_main) == (1, pytest.approx(1 / 3), 0.5)
    assert rep.drowned == ["c"] and "1 of 3 groups of 'source' make up less than 40%" in rep.warning
    assert rep.rare_quarter_purity == pytest.approx(1 / 3)  # the rarest quarter: group c
    assert long_tail_report(CLUSTERS, GROUPS, NAMES, "source", drown=0.3).warning is None
    assert json.loads(json.dumps(rep.to_dict()))["drowned"] == ["c"]


def test_gini_and_size_stats():
    assert gini([4, 4, 4, 4]) == 0.0
    assert gini([0, 0, 0, 10]) == pytest.approx(0.75)
    assert gini([1, 2, 3]) == pytest.approx(2 * (1 + 4 + 9) / (3 * 6) - 4 / 3)
    assert size_stats([5, 1, 3, 9]) == {"min": 1, "median": 4.0, "max": 9, "mean": 4.5,
                                        "gini": pytest.approx(gini([5, 1, 3, 9]))}


@pytest.mark.parametrize("call, message", [
    (lambda: long_tail_report(CLUSTERS, GROUPS, NAMES, "s", drown=0.0), "the drown threshold must be in (0, 1], got 0.0"),
    (lambda: nmi(CLUSTERS, GROUPS[:-1]), "clusters and groups must be 1-D arrays of one length"),
    (lambda: long_tail_report(CLUSTERS, GROUPS, NAMES[:2], "s"), "group code 2 has no name (2 names given)"),
])
def test_bad_input_is_refused(call, message):
    with pytest.raises(ConfigError) as exc:
        call()
    assert message in str(exc.value)


def test_inspect_by_warns_when_kmeans_drowns_the_tail(tmp_path, capsys):
    from test_grouping import SIZES, sources_by_id, write_corpus

    from croupier.format.sidecar import Sidecar

    inputs = tmp_path / "docs.jsonl"
    write_corpus(inputs)
    common = ["--embedder", "hashing", "--quiet", "--shard-size", "16KiB"]
    km, grouped = tmp_path / "km", tmp_path / "grouped"
    assert main(["shards", "build", str(inputs), "--out", str(km), "--clusters", "2", "--keep-fields", "source",
                 *common]) == 0
    assert main(["shards", "build", str(inputs), "--out", str(grouped), "--group-by", "source", *common]) == 0
    capsys.readouterr()
    assert main(["shards", "inspect", str(km), "--by", "source"]) == 0
    out = capsys.readouterr().out
    assert "WARNING:" in out and "hides the long tail" in out and "- apl: 2 docs" in out
    assert main(["shards", "inspect", str(km), "--by", "source", "--json"]) == 0
    by = json.loads(capsys.readouterr().out)["by"]
    # by hand: a group is drowned when it makes up under 10% of the cluster holding most of it
    clusters = np.asarray(Sidecar.open(km).assignments())
    truth = np.array(sources_by_id(km, len(clusters)))
    sizes = np.bincount(clusters)
    drowned = []
    for name in sorted(SIZES, key=lambda s: (SIZES[s], s)):  # smallest first
        spread = np.bincount(clusters[truth == name], minlength=len(sizes))
        main_cluster = int(np.argmax(spread))
        if spread[main_cluster] / sizes[main_cluster] < 0.10:
            drowned.append(name)
    assert "apl" in drowned and by["drowned"] == drowned and by["warning"].startswith("WARNING:")
    assert by["nmi"] == pytest.approx(normalized_mutual_info_score(truth, clusters), abs=1e-12)
    assert len(by["groups"]) == len(SIZES)
    assert main(["shards", "inspect", str(grouped), "--by", "source"]) == 0
    out = capsys.readouterr().out
    assert "NMI 1.000" in out and "WARNING" not in out and "drowned      none" in out
    assert main(["shards", "inspect", str(km), "--by", "topic"]) == 2
    assert "--by 'topic': the dataset keeps no such metadata field (kept columns: source)" in capsys.readouterr().err


def test_tail_share_under_balancing_matches_a_hand_count() -> None:
    # groups: a x6, b x2, c x1, d x1 (rarest quarter: c); clusters: {a x6} and {b x2, c, d}
    names = ["a", "b", "c", "d"]
    groups = np.array([0] * 6 + [1, 1, 2, 3])
    mixed = np.array([0] * 6 + [1, 1, 1, 1])
    rep = long_tail_report(mixed, groups, names, "source")
    assert rep.rare_quarter_share == pytest.approx(0.1)  # 1 of 10 samples
    assert rep.rare_quarter_balanced_share == pytest.approx(0.5 * 0.25)  # cluster 1 half the time, c a quarter of it
    assert rep.tail_gain == pytest.approx(1.25)
    assert rep.tail_warning is not None and "12.5%" in rep.tail_warning and "10.0%" in rep.tail_warning
    assert any("1.25x" in line for line in format_report(rep))
    # c in a cluster of its own: a third of the draws
    apart = np.array([0] * 6 + [1, 1, 2, 1])
    rep = long_tail_report(apart, groups, names, "source")
    assert rep.rare_quarter_balanced_share == pytest.approx(1 / 3)
    assert rep.tail_warning is None
    assert rep.to_dict()["tail_gain"] == pytest.approx(10 / 3)


def test_build_prints_the_tail_check_of_each_kept_field(tmp_path, capsys):
    from test_grouping import SIZES, sources_by_id, write_corpus

    from croupier.format.sidecar import Sidecar

    inputs = tmp_path / "docs.jsonl"
    docs = write_corpus(inputs)
    inputs.write_text("".join(json.dumps({**d, "doc_id": f"d{i}", "lang": "en"}) + "\n" for i, d in enumerate(docs)))
    n = len(docs)
    ds = tmp_path / "km"
    common = ["--embedder", "hashing", "--quiet", "--shard-size", "16KiB", "--clusters", "3"]
    assert main(["shards", "build", str(inputs), "--out", str(ds), "--keep-fields", "source,doc_id,lang",
                 *common]) == 0
    out = capsys.readouterr().out
    # by hand: the rarest quarter of 5 groups is apl (2 documents); balancing deals each of the
    # K clusters 1/K of the draws and each of its members 1/size of that
    side = Sidecar.open(ds)
    clusters = np.asarray(side.assignments())
    sizes = np.bincount(clusters)
    apl = [i for i, s in enumerate(sources_by_id(ds, n)) if s == "apl"]
    balanced = sum(1 / sizes[clusters[i]] for i in apl) / len(sizes)
    natural = SIZES["apl"] / n
    grouped = (1 / len(SIZES)) / natural  # one cluster per group: apl gets a fifth of the draws
    line = next(x for x in out.splitlines() if x.startswith("tail check by 'source'"))
    assert (f"5 groups; its rarest quarter holds {natural:.1%} of the samples, balancing these clusters deals it "
            f"{balanced:.1%} ({balanced / natural:.2f}x), one cluster per group would deal it {grouped:.2f}x") in line
    # three k-means clusters mix apl's two documents into large ones: balancing gives the tail no lift
    assert balanced / natural < 1.5
    assert (f"WARNING: balancing these clusters deals the rarest quarter of 'source' groups {balanced:.1%} of the "
            f"samples against its natural {natural:.1%} ({balanced / natural:.2f}x, below 1.5x)") in out
    assert f"tail check by 'doc_id': skipped (more than {n // 2} values for {n} documents: not a grouping)" in out
    assert f"tail check by 'lang': skipped (a single value in all {n} documents)" in out
    assert main(["shards", "build", str(inputs), "--out", str(ds), "--keep-fields", "source", "--overwrite",
                 "--no-tail-check", *common]) == 0
    assert "tail check" not in capsys.readouterr().out


def test_group_names_of_numpy_values_are_those_of_the_python_values():
    from croupier.shards.build.grouping import group_name

    assert group_name(np.int64(3)) == group_name(3) == "3"
    assert group_name(np.array([1, 2])) == group_name([1, 2]) == "[1,2]"
    assert group_name(np.str_("web")) == "web"


def test_a_grouped_builds_own_field_comes_from_the_sidecar_not_the_shards(tmp_path, capsys, monkeypatch):
    from test_grouping import SIZES, write_corpus

    from croupier.shards.build import mds

    inputs = tmp_path / "docs.jsonl"
    write_corpus(inputs)
    assert main(["shards", "build", str(inputs), "--out", str(tmp_path / "g"), "--group-by", "source",
                 "--embedder", "hashing", "--quiet", "--shard-size", "16KiB", "--no-tail-check"]) == 0
    capsys.readouterr()
    read: list[str] = []

    class Recording(mds.MDSSource):  # the real reader, noting that the shards were opened
        def __init__(self, *args, **kwargs):
            read.append(str(args[0]))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(mds, "MDSSource", Recording)
    assert main(["shards", "inspect", str(tmp_path / "g"), "--by", "source"]) == 0
    assert "NMI 1.000" in capsys.readouterr().out
    from croupier.shards.tail_check import tail_checks

    out = "\n".join(line for c in tail_checks(str(tmp_path / "g"), ["source"]) for line in c.lines())
    grouped = (1 / len(SIZES)) / (SIZES["apl"] / sum(SIZES.values()))
    assert "tail check by 'source': 5 groups" in out and f"({grouped:.2f}x), one cluster per group would deal it " \
        f"{grouped:.2f}x" in out and "WARNING" not in out
    assert read == []  # inspect and the check took the codes from the sidecar's groups.npy, not the MDS column


def test_a_tail_check_that_cannot_read_its_column_leaves_the_finished_build_alone(tmp_path, capsys, monkeypatch):
    from test_grouping import write_corpus

    from croupier.errors import DatasetError
    from croupier.format.sidecar import Sidecar
    from croupier.shards import tail_check

    inputs = tmp_path / "docs.jsonl"
    write_corpus(inputs)

    def unreadable(*args, **kwargs):
        raise DatasetError("shard.00001.mds: unreadable (injected)")

    monkeypatch.setattr(tail_check, "field_codes", unreadable)
    ds = tmp_path / "km"
    assert main(["shards", "build", str(inputs), "--out", str(ds), "--keep-fields", "source", "--clusters", "3",
                 "--embedder", "hashing", "--quiet", "--shard-size", "16KiB"]) == 0
    out = capsys.readouterr().out
    assert "tail check: skipped (shard.00001.mds: unreadable (injected))" in out
    assert Sidecar.open(ds).num_samples == 398  # the dataset is published and whole
