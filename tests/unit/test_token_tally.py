"""Tokens dealt per cluster: exact against the generated ids, carried through checkpoints, shown in
status (table, JSON) and the report."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from croupier.client.cli.admin_cli import format_status, status_dict
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.serving.service import status_response
from jobs import batch

SIZES = [300, 120, 40, 7]
B = 16


def counts() -> np.ndarray:
    return (np.arange(sum(SIZES)) * 7919 % 97 + 3).astype(np.int32)


def job(state: Path | None, every: int = 5) -> Job:
    return Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=3), B, 1,
               spec=JobSpec(name="t", checkpoint_every=every), store=None if state is None else CheckpointStore(state),
               token_counts=[(0, counts())])


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Jobs a test opens on a state directory, closed when the test ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


def expected(batches: list[np.ndarray]) -> np.ndarray:
    ids = np.concatenate(batches)
    return np.bincount(np.searchsorted(np.cumsum(SIZES), ids, side="right"), weights=counts()[ids],
                       minlength=len(SIZES)).astype(np.int64)


def test_tokens_per_cluster_are_exact_and_survive_a_restart(tmp_path: Path, closing: ExitStack) -> None:
    j = closing.enter_context(job(tmp_path / "s"))
    batches = [batch(j, t) for t in range(23)]
    st = j.status()
    assert st.tokens is not None and np.array_equal(st.tokens, expected(batches)) and st.tokens_since == 0
    j.checkpoint_now()
    j.close()
    again = closing.enter_context(job(tmp_path / "s"))
    assert again.resumed_from == 23
    batches += [batch(again, t) for t in range(23, 40)]
    assert np.array_equal(again.status().tokens, expected(batches))
    resp = status_response(again, again.status(), include_clusters=True)
    assert resp.tokens_counted and resp.tokens_drawn == int(expected(batches).sum())
    assert status_dict(resp)["tokens"]["per_cluster"] == expected(batches).tolist()
    assert f"tokens dealt: {int(expected(batches).sum()):,}" in format_status(resp)


def test_a_job_without_counts_shows_none(tmp_path: Path) -> None:
    j = Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=3), B, 1)
    batch(j, 3)
    resp = status_response(j, j.status(), include_clusters=True)
    assert not resp.tokens_counted and status_dict(resp)["tokens"] is None
    assert "tokens dealt" not in format_status(resp)


def test_the_report_shows_tokens_per_cluster(tmp_path: Path, closing: ExitStack) -> None:
    from croupier.apps.report import ReportData, cluster_table

    j = closing.enter_context(job(tmp_path / "s"))
    batches = [batch(j, t) for t in range(10)]
    st = j.status()
    j.close()
    data = ReportData(source="t", policy="clusterclip", clip=3, step=10, global_batch=B, seed=1, sizes=st.sizes,
                      draws=st.draws, passes=st.passes, clipped_at=st.clipped_at, tokens=st.tokens)
    table = cluster_table(data)
    assert table.splitlines()[0].split()[-1] == "tokens"
    row = [line.split() for line in table.splitlines()[1:] if line.split()[0] == "0"][0]
    assert int(row[-1]) == int(expected(batches)[0])
