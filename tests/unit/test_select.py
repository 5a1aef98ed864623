"""Selection: exact keep counts, determinism, inverse propensity, per-cluster quotas, sidecar
persistence, and a selection driving the sampler (in process and through `croupier serve`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cases.select import selection_sampler
from croupier.cli import main
from croupier.errors import ConfigError, DatasetError
from croupier.format.sidecar import Sidecar
from croupier.server.sampling.policy import POLICIES, PolicyConfig
from croupier.server.sampling.sampler import Sampler
from croupier.shards.scoring.select import allocate, keep_count, priorities, select, top_k, top_k_per_group


# -- pure selectors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,f,k", [(10, 0.3, 3), (10, 0.25, 3), (10, 0.24, 2), (7, 1.0, 7), (1000, 0.001, 1),
                                   (3, 0.5, 2)])
def test_keep_count_is_exact(n, f, k):
    assert keep_count(n, f) == k


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.0001, 2.0, float("nan"), float("inf")])
def test_keep_outside_unit_interval_is_refused(bad):
    with pytest.raises(ConfigError, match=r"keep fraction must be in \(0, 1\]"):
        keep_count(100, bad)


def test_keep_that_keeps_nothing_is_refused():
    with pytest.raises(ConfigError, match="keeps no sample"):
        keep_count(100, 0.001)


def test_unknown_selector_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="valid: askllm, density, perplexity, random"):
        select("quality", 0.5, n=10)


def test_top_k_lowest_k_ties_and_nan():
    s = np.array([0.5, 0.9, 0.9, np.nan, 0.1, 0.7], dtype=np.float32)
    assert select("askllm", 0.5, scores=s).tolist() == [1, 2, 5]
    assert select("askllm", 1 / 6, scores=s).tolist() == [1]  # tie 1 vs 2 -> lower id
    assert select("perplexity", 0.5, scores=s).tolist() == [0, 4, 5]
    assert select("perplexity", 1.0, scores=s).tolist() == list(range(6))
    # NaN ranks last for both directions
    assert 3 not in select("askllm", 5 / 6, scores=s) and 3 not in select("perplexity", 5 / 6, scores=s)


def test_selections_are_deterministic_under_a_seed():
    rng = np.random.default_rng(0)
    dens = rng.uniform(1, 100, 5000).astype(np.float32)
    for by, kw in (("density", dict(scores=dens)), ("random", dict(n=5000))):
        a = select(by, 0.2, seed=3, **kw)
        assert np.array_equal(a, select(by, 0.2, seed=3, **kw))
        assert not np.array_equal(a, select(by, 0.2, seed=4, **kw))
        assert len(a) == 1000 and a.dtype == np.int64 and (np.diff(a) > 0).all()


def test_inverse_propensity_draw_probabilities():
    """k = 1: P(pick i) = (1/density_i) / sum_j (1/density_j) (Efraimidis-Spirakis is exact)."""
    dens = np.array([1.0, 2.0, 4.0, 8.0])
    picks = np.array([int(np.argmax(priorities("density", dens, 4, seed=s))) for s in range(6000)])
    freq = np.bincount(picks, minlength=4) / len(picks)
    want = (1 / dens) / (1 / dens).sum()
    np.testing.assert_allclose(freq, want, atol=0.025)


def test_density_scores_must_be_positive():
    with pytest.raises(ConfigError, match="positive and finite"):
        select("density", 0.5, scores=np.array([1.0, 0.0, 2.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=12), st.floats(0.01, 1.0))
def test_per_cluster_quotas_sum_exactly_and_track_the_fraction(sizes, f):
    total = sum(sizes)
    try:
        k = keep_count(total, f)
    except ConfigError:
        return
    quota = allocate(np.array(sizes), f)
    assert quota.sum() == k
    assert (quota <= np.array(sizes)).all() and (quota >= 0).all()
    assert (np.abs(quota - np.array(sizes) * k / total) < 1).all()


def test_per_cluster_keeps_the_best_inside_every_cluster():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    rng.shuffle(labels)
    labels[:3] = -1  # outside every cluster: their own group
    scores = rng.random(len(labels))
    ids = top_k_per_group(scores, labels, 0.2)
    assert len(ids) == keep_count(len(labels), 0.2)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        kept = np.intersect1d(ids, members)
        best = members[np.argsort(-scores[members], kind="stable")[:len(kept)]]
        assert set(kept) == set(best)
    q = allocate(np.bincount(labels + 1), 0.2)
    assert [len(np.intersect1d(ids, np.flatnonzero(labels == c))) for c in range(-1, 4)] == q.tolist()
    assert np.array_equal(top_k(scores, 5), np.sort(np.argsort(-scores)[:5]))


# -- through the sidecar and the CLI ------------------------------------------------------------------
def test_cli_selects_exact_counts_and_versions_named_subsets(ds: Path, capsys):
    assert main(["shards", "score", str(ds), "--by", "density", "--rows", "64", "--buckets", "512",
                 "--no-progress"]) == 0
    side = Sidecar.open(ds)
    n = side.num_samples
    assert main(["shards", "select", str(ds), "--by", "density", "--keep", "0.25", "--seed", "1"]) == 0
    assert main(["shards", "select", str(ds), "--by", "random", "--keep", "0.1", "--per-cluster",
                 "--name", "rnd"]) == 0
    assert main(["shards", "select", str(ds), "--by", "random", "--keep", "0.1", "--per-cluster",
                 "--name", "rnd", "--seed", "9"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out
    side = Sidecar.open(ds)
    assert set(side.selection_names()) == {"density-0.25", "rnd"}
    dens_ids = side.selection("density-0.25")
    assert len(dens_ids) == keep_count(n, 0.25)
    assert np.array_equal(dens_ids, select("density", 0.25, scores=np.asarray(side.scores("density")), seed=1))
    p = side.selection_params("rnd")
    assert p["version"] == 2 and p["k"] == len(side.selection("rnd")) == keep_count(n, 0.1)
    assert p["per_cluster"] is True and p["seed"] == 9
    assert side.selection_params("density-0.25")["score_params"]["rows"] == 64
    quota = allocate(np.bincount(np.asarray(side.assignments())), 0.1)
    got = np.bincount(np.asarray(side.assignments())[side.selection("rnd")], minlength=len(quota))
    assert np.array_equal(got, quota)


def test_cli_bad_input(ds: Path, capsys):
    assert main(["shards", "select", str(ds), "--by", "askllm", "--keep", "0.5"]) == 2
    assert "needs the score column 'askllm'" in capsys.readouterr().err
    assert main(["shards", "select", str(ds), "--by", "best", "--keep", "0.5"]) == 2
    assert "unknown selector 'best'" in capsys.readouterr().err
    for keep in ("0", "1.5", "-1"):
        assert main(["shards", "select", str(ds), "--by", "random", "--keep", keep]) == 2
        assert "keep fraction must be in (0, 1]" in capsys.readouterr().err
    assert main(["shards", "score", str(ds), "--by", "quality"]) == 2
    assert "unknown scorer 'quality'; valid: askllm, density, perplexity" in capsys.readouterr().err
    (ds / "croupier" / "embeddings.npy").unlink()
    assert main(["shards", "score", str(ds), "--by", "density", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "density needs the stored embeddings" in err and "embeddings.npy" in err
    with pytest.raises(DatasetError, match=r"embeddings.npy' is missing"):
        Sidecar.open(ds).embeddings()


def test_density_scoring_resumes_after_an_interruption(ds: Path, monkeypatch):
    from croupier.shards.scoring import scorers as score_cli

    side = Sidecar.open(ds)
    full, _ = score_cli.score_density(side, "full", rows=32, buckets=256, bandwidth=0.5, chunk_size=64,
                                      progress=False)
    calls = {"n": 0}
    real_query = score_cli.DensitySketch.query

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C in the middle of pass 2
        return real_query(self, x)

    monkeypatch.setattr(score_cli.DensitySketch, "query", flaky)
    with pytest.raises(KeyboardInterrupt):
        score_cli.score_density(side, "part", rows=32, buckets=256, bandwidth=0.5, chunk_size=64,
                                progress=False)
    work = score_cli.work_dir(side, "part")
    assert (work / "sketch.npz").is_file()
    assert np.fromfile(work / "done.u8", dtype=np.uint8).sum() == 2  # two chunks kept
    monkeypatch.setattr(score_cli.DensitySketch, "query", real_query)
    added = {"n": 0}
    real_add = score_cli.DensitySketch.add
    monkeypatch.setattr(score_cli.DensitySketch, "add",
                        lambda self, x: (added.__setitem__("n", added["n"] + 1), real_add(self, x)))
    again, _ = score_cli.score_density(side, "part", rows=32, buckets=256, bandwidth=0.5, chunk_size=64,
                                       progress=False)
    assert added["n"] == 0  # pass 1 came from the saved sketch
    np.testing.assert_array_equal(again, full)
    assert work.exists()  # kept until the column is stored
    score_cli.discard_work(side, "part")
    assert not work.exists()


def test_two_runs_on_one_work_folder_are_refused(tmp_path: Path):
    from croupier.shards.scoring.lm_scores import ChunkedRun

    with ChunkedRun(tmp_path / "w", 10, 4, {"a": 1}):
        with pytest.raises(ConfigError, match="another scoring run"):
            ChunkedRun(tmp_path / "w", 10, 4, {"a": 1})
    with ChunkedRun(tmp_path / "w", 10, 4, {"a": 1}) as again:  # free once the first closed
        assert again.resumed and len(again.pending()) == 3


def test_a_run_that_cannot_start_releases_its_lock(tmp_path: Path):
    from croupier.shards.scoring.lm_scores import ChunkedRun

    blocker = tmp_path / "w"
    blocker.write_text("a file where the work folder goes")
    with pytest.raises(FileExistsError):
        ChunkedRun(blocker, 10, 4, {"a": 1})
    blocker.unlink()
    with ChunkedRun(blocker, 10, 4, {"a": 1}) as run:  # not "another scoring run": the lock was let go
        assert not run.resumed and len(run.pending()) == 3


def _policy(name: str) -> PolicyConfig:
    if name in ("g2s", "s2g"):
        return PolicyConfig(name, switch_step=4)
    if name == "weighted":
        return None  # built per layout below
    if name == "clusterclip":
        return PolicyConfig(name, clip=2, on_exhausted="random")
    return PolicyConfig(name)


def test_selection_drives_every_policy_and_survives_reopen_and_state_roundtrip(ds: Path):
    assert main(["shards", "select", str(ds), "--by", "random", "--keep", "0.3", "--name", "sub"]) == 0
    side = Sidecar.open(ds)
    chosen = set(np.asarray(side.selection("sub")).tolist())
    k = side.layout(selection="sub").num_clusters
    for name in POLICIES:
        pol = _policy(name) or PolicyConfig(name, weights=tuple(float(i + 1) for i in range(k)))
        s = selection_sampler(ds, "sub", pol)
        batches = [s.next_batch() for _ in range(8)]
        assert [len(b) for b in batches] == [16] * 8, name
        assert all(set(b.tolist()) <= chosen for b in batches), name
        state = s.state().to_bytes()
        tail = [s.next_batch() for _ in range(6)]
        # Re-open the sidecar from disk (a new process would), rebuild, restore, replay.
        from croupier.server.sampling.state import SamplerState
        again = selection_sampler(ds, "sub", pol)
        again.load_state(SamplerState.from_bytes(state))
        for a, b in zip(tail, [again.next_batch() for _ in range(6)]):
            assert np.array_equal(a, b), name
    # A state made on the selection is refused on the full dataset and on a rewritten selection.
    from croupier.errors import FingerprintMismatch
    from croupier.server.sampling.state import SamplerState
    st_bytes = selection_sampler(ds, "sub", PolicyConfig("uniform")).state().to_bytes()
    with pytest.raises(FingerprintMismatch):
        Sampler(side.layout(), PolicyConfig("uniform"), 16, seed=0).load_state(SamplerState.from_bytes(st_bytes))
    assert main(["shards", "select", str(ds), "--by", "random", "--keep", "0.3", "--name", "sub",
                 "--seed", "5"]) == 0
    with pytest.raises(FingerprintMismatch):
        selection_sampler(ds, "sub", PolicyConfig("uniform")).load_state(SamplerState.from_bytes(st_bytes))


def test_simulate_samples_only_inside_the_selection_with_every_policy(ds: Path, capsys):
    assert main(["shards", "select", str(ds), "--by", "random", "--keep", "0.2", "--name", "fifth"]) == 0
    chosen = set(np.asarray(Sidecar.open(ds).selection("fifth")).tolist())
    k = Sidecar.open(ds).layout(selection="fifth").num_clusters
    capsys.readouterr()
    for name in POLICIES:
        extra = {"g2s": ["--switch-step", "3"], "s2g": ["--switch-step", "3"],
                 "clusterclip": ["--clip", "2", "--on-exhausted", "random"],
                 "weighted": ["--weights", ",".join(str(i + 1) for i in range(k))]}.get(name, [])
        assert main(["simulate", "--dataset", str(ds), "--selection", "fifth", "--policy", name, *extra,
                     "--global-batch", "8", "--steps", "12", "--format", "jsonl"]) == 0, name
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert [len(line["indices"]) for line in lines] == [8] * 12, name
        assert set(i for line in lines for i in line["indices"]) <= chosen, name
    assert main(["simulate", "--dataset", str(ds), "--selection", "nope", "--policy", "uniform",
                 "--global-batch", "8", "--steps", "2"]) == 2
    assert "unknown selection 'nope'" in capsys.readouterr().err


