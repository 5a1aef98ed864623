"""Durable state: kill -9 and restart resumes exactly; corrupt checkpoints are detected."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

from cases.durability import SIZES, B, reference
from croupier.errors import StateError
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore, decode_checkpoint, encode_checkpoint
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from jobs import get_slice


@pytest.fixture
def closing() -> Iterator[ExitStack]:
    """Jobs a test opens on a state directory, closed when the test ends, passed or failed."""
    with ExitStack() as stack:
        yield stack


def test_store_detects_every_kind_of_damage(tmp_path: Path) -> None:
    good = encode_checkpoint({"step": 7, "kind": "auto"}, b"state-bytes")
    assert decode_checkpoint(good, "x") == ({"step": 7, "kind": "auto"}, b"state-bytes")
    for bad, reason in ((good[:20], "truncated"), (good[:-1], "truncated"), (b"NOTCKPT!" + good[8:], "magic"),
                        (good[:-1] + bytes([good[-1] ^ 1]), "checksum")):
        with pytest.raises(StateError, match=reason):
            decode_checkpoint(bad, "x")


def test_store_retention_keeps_trainer_checkpoints(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=2)
    store.write(5, {}, b"a", kind="token")
    for step in (10, 20, 30, 40):
        store.write(step, {}, b"b")
    store.write(35, {}, b"c", kind="token")
    assert store.steps() == [5, 30, 35, 40]
    store.write(45, {}, b"d", kind="token")
    assert store.steps() == [30, 35, 40, 45]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert CheckpointStore(tmp_path).newest_valid(at_or_before=39).step == 35


def test_job_resumes_from_the_previous_checkpoint_when_the_newest_is_corrupt(tmp_path: Path, caplog,
                                                                            closing: ExitStack) -> None:
    spec = JobSpec(max_lag=8, max_lookahead=4, checkpoint_every=10)

    def make() -> Job:
        return closing.enter_context(Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=5), B,
                                         spec=spec, store=CheckpointStore(tmp_path)))

    job = make()
    job.join(0, 1)
    for t in range(25):
        get_slice(job, 0, 1, t)
        job.ack(0, 1, t + 1)
    job.close()  # drains the background checkpoint writer
    (tmp_path / "ckpt-000000000020.bin").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="croupier"):
        again = make()
    assert again.resumed_from == 10
    assert any(getattr(r, "event", "") == "checkpoint_corrupt" for r in caplog.records)
    ref = reference(30)
    again.ack(0, 1, 22)  # the reconnecting rank says where it is
    assert np.array_equal(get_slice(again, 0, 1, 22).ids, ref[22])
    assert np.array_equal(get_slice(again, 0, 1, 12).ids, ref[12])
