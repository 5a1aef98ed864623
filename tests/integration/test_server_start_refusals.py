"""`croupier serve` on a state directory whose checkpoints are all invalid refuses to start, and
`--fresh` starts over."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from cases.server_faults import CONFIG, SIZES, B, make_job
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec, StateDirInvalid
from jobs import get_slice
from workers.harness import env_for_subprocess, python


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Jobs a test opens on a state directory, closed when the test ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


def test_checkpoints_all_invalid_are_refused_and_fresh_starts_over(tmp_path, closing: ExitStack) -> None:
    job = closing.enter_context(make_job(CheckpointStore(tmp_path)))
    job.join(0, 1)
    for t in range(25):
        get_slice(job, 0, 1, t)
        job.ack(0, 1, t + 1)
    job.close()
    steps = CheckpointStore(tmp_path).steps()
    assert steps
    for s in steps:
        (tmp_path / f"ckpt-{s:012d}.bin").write_bytes(b"garbage")
    with pytest.raises(StateDirInvalid, match=r"none is valid .*ckpt-000000000020\.bin: .*truncated.*--fresh"):
        closing.enter_context(make_job(CheckpointStore(tmp_path)))
    fresh = closing.enter_context(Job(ClusterLayout.from_sizes(SIZES), CONFIG, B,
                                      spec=JobSpec(max_lag=8, max_lookahead=4), store=CheckpointStore(tmp_path),
                                      fresh=True))
    assert fresh.resumed_from is None and CheckpointStore(tmp_path).steps() == []
    assert list(tmp_path.glob("stale-*/ckpt-*.bin"))
    fresh.close()
    cli = tmp_path / "cli"
    cli.mkdir()
    (cli / "ckpt-000000000007.bin").write_bytes(b"garbage")
    done = subprocess.run([python(), "-m", "croupier", "serve", "--cluster-sizes", "5,5", "--global-batch", "2",
                           "--policy", "uniform", "--state-dir", str(cli)], env=env_for_subprocess(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done
    assert "ckpt-000000000007.bin" in done.stderr and "none is valid" in done.stderr
