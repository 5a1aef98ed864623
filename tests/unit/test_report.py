"""`croupier report`: its plots from plain arrays, its command line, and a state directory that names
no dataset."""

from __future__ import annotations

import numpy as np
import pytest

from cases.report import pngs_ok
from croupier.apps import report
from croupier.apps import report_plots as rp
from croupier.cli import main as cli_main
from croupier.errors import ConfigError
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from jobs import batch


def test_plots_from_plain_arrays(tmp_path):
    sizes = np.array([500, 120, 40, 9, 3])
    draws = np.array([300, 240, 120, 27, 9])
    clipped = np.array([-1, -1, -1, 41, 17])
    rp.plot_sizes_vs_draws(sizes, draws, tmp_path / "a.png", policy="clusterclip", clip=3, clipped_at=clipped)
    rp.plot_passes(sizes, draws, tmp_path / "b.png", clip=3, clipped_at=clipped)
    steps = np.arange(0, 60, 10)
    hist = np.outer(steps / 50.0, draws)
    rp.plot_draws_over_time(steps, hist, sizes, tmp_path / "c.png", clip=3)
    rp.plot_rank_lag(np.arange(5.0), np.array([[0, 0], [1, 2], [3, 3], [4, 6], [8, 8]]), tmp_path / "d.png", max_lag=4)
    pngs_ok(tmp_path, ["a.png", "b.png", "c.png", "d.png"])
    with pytest.raises(ConfigError, match="one length"):
        rp.plot_sizes_vs_draws(sizes, draws[:3], tmp_path / "x.png")
    with pytest.raises(ConfigError, match="shape"):
        rp.plot_draws_over_time(steps, hist[:, :2], sizes, tmp_path / "x.png")


def test_report_cli_needs_a_source(capsys):
    with pytest.raises(SystemExit):
        cli_main(["report", "--out", "x"])
    assert "--server" in capsys.readouterr().err


def test_a_state_dir_that_names_no_dataset_needs_one(tmp_path):
    """A job of --cluster-sizes has no dataset: its state directory (no server.json naming one)
    is refused without --dataset, by name."""
    with Job(ClusterLayout.from_sizes([50, 20, 5]), PolicyConfig("clusterclip", clip=2), 8,
             spec=JobSpec(name="r"), store=CheckpointStore(tmp_path)) as job:
        for t in range(5):
            batch(job, t)
        assert job.checkpoint_now() == 5
    with pytest.raises(ConfigError, match="does not name its dataset: pass --dataset DIR"):
        report.from_state_dir(tmp_path)
