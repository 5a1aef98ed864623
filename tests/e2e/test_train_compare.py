"""The training comparison runs at a tiny size through the real server and client; the tiny LM
it trains is deterministic; the benchmark runner finds and tabulates benchmarks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bench.studies import train_compare
from cases.bench import bench_runner
from croupier.apps.tinylm import (
    PAD,
    TinyLMConfig,
    build_model,
    encode,
    example_losses,
    loss,
    make_optimizer,
    per_cluster_mean,
    train_step,
)
from croupier.errors import ConfigError  # noqa: E402


@pytest.mark.slow
def test_comparison_runs_at_tiny_size(tmp_path):
    results, info = train_compare.compare("tiny", tmp_path / "out")
    names = [r.name for r in results]
    assert names == ["random", "uniform", "clusterclip auto", "clusterclip 2", "clusterclip 6", "g2s", "s2g"]
    sizes = np.asarray(info["cluster_sizes"])
    for r in results:
        # every sampler trained on the same number of examples, dealt by the server
        assert r.examples == info["steps"] * info["params"]["batch"]
        assert int(r.draws[: len(sizes)].sum()) >= r.examples
        for key in ("mean", "rare25", "common25", "rare_gap"):
            assert math.isfinite(r.metrics[key]), (r.name, key)
    by = {r.name: r for r in results}
    assert by["clusterclip 2"].clip == 2 and by["random"].clip is None
    # cluster-balanced sampling repeats the rare clusters far more than plain shuffling
    assert by["uniform"].metrics["max_passes"] > by["random"].metrics["max_passes"]
    out = tmp_path / "out"
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "results.json").read_text())
    assert [r["sampler"] for r in saved["results"]] == names
    table = (out / "table.txt").read_text()
    assert "rare25" in table and "clusterclip auto" in table


def test_split_keeps_every_topic_in_training():
    from croupier.shards.build.synthetic import generate_corpus

    docs = generate_corpus(200, 6, alpha=1.3, seed=0)
    train, held = train_compare.split_corpus(docs)
    assert len(train) + len(held) == len(docs)
    assert {d["topic"] for d in train} == {d["topic"] for d in docs}
    assert len(held) >= train_compare.MIN_HELDOUT * 2


def test_tiny_lm_is_deterministic_and_learns():
    cfg = TinyLMConfig(context=32, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    a, b = build_model(cfg, seed=3), build_model(cfg, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), build_model(cfg, seed=4).parameters()))
    batch = encode(["the cat sat on the mat", "a dog barked at the moon"] * 4, cfg.context)
    assert batch.shape == (8, 33) and int(batch[0, -1]) == PAD
    before = float(loss(a, batch).detach())
    opt_a, opt_b = make_optimizer(a), make_optimizer(b)
    la = [train_step(a, opt_a, batch) for _ in range(15)]
    lb = [train_step(b, opt_b, batch) for _ in range(15)]
    assert la == lb  # same seed, same data: the same run
    assert la[-1] < before - 0.5
    per = example_losses(a, batch, batch_size=3)
    assert per.shape == (8,) and np.allclose(per[0::2], per[0])
    means = per_cluster_mean(np.array([1.0, 3.0, 5.0]), np.array([0, 0, 2]), 4)
    assert means[0] == 2.0 and means[2] == 5.0 and np.isnan(means[1]) and np.isnan(means[3])
    with pytest.raises(ConfigError, match="not divisible"):
        TinyLMConfig(d_model=30, n_heads=4)


def test_bench_runner_discovers_and_tabulates():
    names = bench_runner.discover()
    assert names and all(n.startswith("bench_") for n in names)
    assert "train_compare" not in names  # a study, not a ratio benchmark
    table = bench_runner.format_table([
        {"bench": "x", "metric": "speed", "value": 12.5, "unit": "it/s", "reference": 5.0, "ratio": 2.5,
         "target": ">= 1"},
        {"bench": "y", "metric": "FAILED", "value": None, "unit": "", "reference": None, "ratio": None,
         "target": "boom"},
    ])
    lines = table.splitlines()
    assert lines[0].split() == list(bench_runner.COLUMNS)
    assert "2.500" in lines[2] and "FAILED" in lines[3]
    with pytest.raises(SystemExit):
        bench_runner.main(["--only", "no_such_bench"])
