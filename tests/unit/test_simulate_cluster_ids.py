"""`croupier simulate --cluster-ids FILE.npy` (in-process): the batch sampler's sequence, bad files refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from croupier.cli import main
from croupier.client import ClusterBatchSampler


def ids_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    ids = np.array([0, 1, 2, 0, 0, -1, 1, 3, 0, 2, 1, 0, -1, 3, 0, 0, 1, 2, 0, 1] * 5, dtype=np.int32)
    path = tmp_path / "ids.npy"
    np.save(path, ids)
    return path, ids


def test_jsonl_is_the_batch_sampler_sequence_and_summary_counts_the_clusters(tmp_path, capsys) -> None:
    path, ids = ids_file(tmp_path)
    flags = ["--policy", "clusterclip", "--clip", "2", "--global-batch", "12", "--seed", "4", "--steps", "15"]
    for rank in range(3):
        assert main(["simulate", "--cluster-ids", str(path), *flags, "--format", "jsonl", "--world", "3",
                     "--rank", str(rank)]) == 0
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        sampler = ClusterBatchSampler(ids, policy="clusterclip", clip=2, global_batch=12, seed=4, rank=rank, world=3,
                                      steps=15)
        assert [r["step"] for r in rows] == list(range(15))
        assert [r["indices"] for r in rows] == list(sampler)
    assert main(["simulate", "--cluster-ids", str(path), *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("policy clusterclip  clusters 4  samples 90  global batch 12  steps 15  seed 4\n")


@pytest.mark.parametrize(("content", "name", "message"), [
    (np.array([0.0, 1.0]), "f.npy", "--cluster-ids {p} must be integers (a cluster id per index, -1 = excluded), "
                                    "got dtype float64"),
    (np.zeros((2, 2), dtype=int), "m.npy", "--cluster-ids {p} must be 1-D (one cluster id per dataset index), "
                                           "got shape (2, 2)"),
    (np.array([], dtype=np.int64), "e.npy", "--cluster-ids {p} are empty"),
    (np.full(3, -1), "x.npy", "--cluster-ids {p}: all 3 indices are -1 (excluded); no index is left to sample"),
    (np.array([0, 2]), "g.npy", "--cluster-ids {p} must be dense (every id in 0..2 used); cluster 1 has no index"),
    (np.array([0, 1]), "ids.txt", "--cluster-ids {p}: not a .npy file"),
    (b"not an array", "t.npy", "--cluster-ids {p}: not a readable .npy array of integers"),
    (np.array([{"a": 1}], dtype=object), "o.npy", "--cluster-ids {p}: not a readable .npy array of integers"),
    (None, "missing.npy", "--cluster-ids {p}: cannot read it: No such file or directory"),
])
def test_a_bad_file_is_refused_in_one_line(tmp_path, capsys, content, name, message) -> None:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        with p.open("wb") as f:
            np.save(f, content, allow_pickle=True)
    code = main(["simulate", "--cluster-ids", str(p), "--clip", "1", "--global-batch", "2", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert message.format(p=p) in err


@pytest.mark.parametrize(("extra", "message"), [
    (["--selection", "top"], "--selection needs --dataset: with --cluster-ids, set excluded indices to -1"),
    (["--block-size", "4"], "--block-size 4 applies to --cluster-sizes only"),
])
def test_flags_of_other_layouts_are_refused(tmp_path, capsys, extra, message) -> None:
    path, _ = ids_file(tmp_path)
    code = main(["simulate", "--cluster-ids", str(path), "--clip", "1", "--global-batch", "2", "--steps", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cluster_ids_exclude_the_other_layout_sources(tmp_path, capsys) -> None:
    path, _ = ids_file(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--cluster-ids", str(path), "--cluster-sizes", "3,4", "--clip", "1", "--global-batch", "2",
              "--steps", "2"])
    assert exit_.value.code == 2
    assert "argument --cluster-sizes: not allowed with argument --cluster-ids" in capsys.readouterr().err
