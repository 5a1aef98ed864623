"""`croupier simulate`: jsonl and summary output, rank slices, the collapse warning, bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

from croupier.cli import main
from croupier.layout import ClusterLayout
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.sampler import Sampler


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_jsonl_matches_the_engine_and_rank_slices(capsys) -> None:
    args = ["simulate", "--cluster-sizes", "5000,300,20,1", "--policy", "clusterclip", "--clip", "3",
            "--global-batch", "64", "--steps", "5", "--seed", "2", "--format", "jsonl"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 5
    s = Sampler(ClusterLayout.from_sizes([5000, 300, 20, 1]), PolicyConfig("clusterclip", clip=3), 64, 2)
    for t, row in enumerate(rows):
        assert row["step"] == t
        assert row["indices"] == s.next_batch().tolist()
    code, out, _ = run_cli(capsys, *args, "--world", "4", "--rank", "1")
    sliced = [json.loads(line)["indices"] for line in out.splitlines()]
    assert len(sliced) == 5 and sliced == [r["indices"][16:32] for r in rows]


def test_summary_shows_table_schedule_and_collapse_warning(capsys) -> None:
    code, out, _ = run_cli(capsys, "simulate", "--cluster-sizes", "5000,300,20,1", "--policy", "clusterclip",
                           "--clip", "3", "--global-batch", "64", "--steps", "100")
    assert code == 0
    assert "clipped at" in out and "schedule" in out
    assert "WARNING: training ends with 1 of 4 clusters active" in out
    code, out, _ = run_cli(capsys, "simulate", "--cluster-sizes", "5000,300,20,1", "--policy", "clusterclip",
                           "--clip", "auto", "--budget-steps", "100", "--global-batch", "64", "--steps", "100")
    assert code == 0
    assert "(auto)" in out and "WARNING" not in out


def test_end_of_data_is_reported(capsys) -> None:
    code, out, _ = run_cli(capsys, "simulate", "--cluster-sizes", "10,5", "--policy", "clusterclip", "--clip", "1",
                           "--global-batch", "5", "--steps", "10")
    assert code == 0 and "END OF DATA at step 3" in out


def test_bad_input_exits_nonzero_with_the_rule(capsys) -> None:
    def cli(*argv: str) -> SimpleNamespace:
        code, _, err = run_cli(capsys, "simulate", *argv)
        return SimpleNamespace(returncode=code, stderr=err)

    r = cli("--cluster-sizes", "5,3", "--policy", "bogus", "--global-batch", "4", "--steps", "2")
    assert r.returncode == 2 and "valid policies: random, uniform, clusterclip, g2s, s2g, weighted" in r.stderr
    r = cli("--cluster-sizes", "5,0", "--policy", "uniform", "--global-batch", "4", "--steps", "2")
    assert r.returncode == 2 and "cluster 1 has size 0" in r.stderr
    r = cli("--cluster-sizes", "5,3", "--policy", "clusterclip", "--clip", "0", "--global-batch", "4", "--steps", "2")
    assert r.returncode == 2 and "clip must be an integer >= 1, got 0" in r.stderr
    r = cli("--cluster-sizes", "5,3", "--policy", "uniform", "--global-batch", "6", "--steps", "2",
            "--world", "4", "--rank", "0", "--format", "jsonl")
    assert r.returncode == 2 and "global batch 6 is not divisible by world size 4" in r.stderr
    r = cli("--cluster-sizes", "5,3", "--policy", "uniform", "--global-batch", "4", "--steps", "-1")
    assert r.returncode == 2 and "steps must be >= 0, got -1" in r.stderr
    r = cli("--cluster-sizes", "", "--policy", "uniform", "--global-batch", "4", "--steps", "1")
    assert r.returncode == 2 and "cluster-sizes is empty" in r.stderr
    r = cli("--dataset", "nowhere", "--block-size", "4", "--policy", "uniform", "--global-batch", "4", "--steps", "1")
    assert r.returncode == 2 and "--block-size 4 applies to --cluster-sizes only" in r.stderr
