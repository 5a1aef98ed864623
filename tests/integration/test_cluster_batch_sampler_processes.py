"""`ClusterBatchSampler` with processes: `croupier simulate --cluster-ids` run as a command prints
the sampler's indices, and a `StatefulDataLoader` with forked workers resumes it exactly."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from croupier.client import ClusterBatchSampler
from roundtrip import assert_resume_exact
from workers.harness import CROUPIER, env_for_subprocess

N = 240


def hf_dataset():
    """A Hugging Face dataset with a long-tailed cluster column (a few rows excluded with -1)."""
    import datasets

    rng = np.random.default_rng(11)
    ids = rng.choice(5, size=N, p=[0.5, 0.25, 0.15, 0.07, 0.03])
    ids[:5] = np.arange(5)
    ids[rng.choice(np.arange(5, N), size=15, replace=False)] = -1
    return datasets.Dataset.from_dict({"row": list(range(N)), "text": [f"doc {i}" for i in range(N)],
                                       "cluster": ids.tolist()})


@pytest.mark.parametrize(("flags", "options"), [
    (["--policy", "clusterclip", "--clip", "2"], {"policy": "clusterclip", "clip": 2}),
    (["--clip", "auto", "--budget-steps", "40"], {"policy": None, "clip": "auto", "budget_steps": 40}),
    (["--policy", "weighted", "--weights", "1,1,2,0,3", "--on-exhausted", "random", "--clip", "1"],
     {"policy": "weighted", "weights": [1, 1, 2, 0, 3], "on_exhausted": "random", "clip": 1}),
])
def test_simulate_cluster_ids_prints_each_ranks_indices(tmp_path: Path, flags, options) -> None:
    ds = hf_dataset()
    path = tmp_path / "x.npy"
    np.save(path, np.asarray(ds["cluster"][:]))
    for rank in range(2):
        out = subprocess.run([CROUPIER, "simulate", "--cluster-ids", str(path), *flags, "--global-batch", "10",
                              "--seed", "3", "--steps", "40", "--format", "jsonl", "--world", "2", "--rank", str(rank)],
                             capture_output=True, text=True, timeout=120, check=True,
                             env=env_for_subprocess()).stdout
        rows = [json.loads(line) for line in out.splitlines()]
        sampler = ClusterBatchSampler(ds["cluster"], **options, global_batch=10, seed=3, rank=rank, world=2,
                                      steps=40)
        assert [r["step"] for r in rows] == list(range(40))
        assert [r["indices"] for r in rows] == list(sampler)


def test_simulate_refuses_a_bad_file_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.full(4, -1))
    r = subprocess.run([CROUPIER, "simulate", "--cluster-ids", str(path), "--clip", "1", "--global-batch", "2",
                        "--steps", "2"], capture_output=True, text=True, timeout=120, env=env_for_subprocess())
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == (f"croupier simulate: error: --cluster-ids {path}: all 4 indices are -1 (excluded); "
                        "no index is left to sample\n")


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("k", [3, 9])
def test_stateful_dataloader_resumes_exactly_across_passes(num_workers: int, k: int) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    ds = hf_dataset()

    def make() -> dict:
        sampler = ClusterBatchSampler(ds["cluster"], policy="clusterclip", clip=3, global_batch=8, seed=2, rank=1,
                                      world=2, steps=10)
        loader = StatefulDataLoader(ds, batch_sampler=sampler, num_workers=num_workers, collate_fn=list)
        return {"loader": loader, "it": None}

    def advance(h: dict) -> list[tuple[int, str]]:
        if h["it"] is None:
            h["it"] = iter(h["loader"])
        try:
            batch = next(h["it"])
        except StopIteration:  # the pass of 10 steps ended: the next pass continues the sequence
            h["it"] = iter(h["loader"])
            batch = next(h["it"])
        return [(r["row"], r["text"]) for r in batch]

    def load(h: dict, state: dict) -> None:
        h["loader"].load_state_dict(state)

    tail = assert_resume_exact(make, advance, lambda h: h["loader"].state_dict(), load, k=k, tail=16)
    whole = list(ClusterBatchSampler(ds["cluster"], policy="clusterclip", clip=3, global_batch=8, seed=2, rank=1,
                                     world=2, steps=k + 16))
    assert [[row for row, _ in step] for step in tail] == whole[k:]
    assert all(text == f"doc {row}" for step in tail for row, text in step)
