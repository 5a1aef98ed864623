"""Loss feedback on a job dealt in tokens: a report's losses count by each piece's tokens in the
slice (a document split between ranks or steps counts each part by its tokens), the controller
re-weights the document sampler through online changes of token steps, and a restart from the
state directory replays the adapted sequence exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cases.adapt import HOT, SIZES, losses_of
from croupier.errors import ConfigError
from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.feedback.adapt import AdaptSpec
from croupier.server.feedback.loss_stats import LossStats
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig
from croupier.server.sampling.token_stream import TokenSchedule
from jobs import get_slice

COUNTS = (np.arange(sum(SIZES)) * 31 % 113 + 4).astype(np.int64)
CHUNK = 8
TOKENS = 512
WORLD = 2


def test_a_groups_loss_is_per_token_when_weights_are_given() -> None:
    s = LossStats(2)
    s.add(0, np.array([0, 0, 1]), np.array([1.0, 4.0, 2.0]), np.array([10.0, 30.0, 5.0]))
    assert s.ema.tolist() == [3.25, 2.0]  # (1 x 10 + 4 x 30) / 40, not (1 + 4) / 2
    plain = LossStats(2)
    plain.add(0, np.array([0, 0, 1]), np.array([1.0, 4.0, 2.0]))
    assert plain.ema.tolist() == [2.5, 2.0]
    with pytest.raises(ConfigError, match="one positive number per loss"):
        s.add(1, np.array([0]), np.array([1.0]), np.array([0.0]))


def token_job(store: CheckpointStore) -> Job:
    return Job(ClusterLayout.from_sizes(SIZES), PolicyConfig("clusterclip", clip=50), CHUNK, 0,
               spec=JobSpec(name="a", max_lookahead=2, checkpoint_every=10), store=store,
               adapt=AdaptSpec("loss-softmax", every=10),
               tokens=(TokenSchedule.constant(TOKENS), [(0, COUNTS)], CHUNK))


def train(job: Job, start: int, stop: int) -> list[list[np.ndarray]]:
    """Every rank reads, acknowledges and reports each step; per step, the ranks' ids."""
    for r in range(WORLD):
        job.join(r, WORLD, "a")
    out = []
    for t in range(start, stop):
        parts = []
        for r in range(WORLD):
            sl = get_slice(job, r, WORLD, t, timeout=10)
            assert sl.spans is not None and int((sl.spans[:, 1] - sl.spans[:, 0]).sum()) == TOKENS // WORLD
            job.ack(r, WORLD, t + 1)
            acc, refused = job.report_losses(r, WORLD, [(t, losses_of(sl.ids), None)], "a")
            assert (acc, refused) == (1, [])
            parts.append(sl.ids.copy())
        out.append(parts)
    return out


def hot_tokens(steps: list[list[np.ndarray]]) -> float:
    ids = np.concatenate([p for parts in steps for p in parts])
    return float((COUNTS[ids] * (ids // 200 == HOT)).sum() / COUNTS[ids].sum())


def test_a_token_job_adapts_and_a_restart_replays_it(tmp_path: Path) -> None:
    job = token_job(CheckpointStore(tmp_path / "state"))
    try:
        got = train(job, 0, 60)
        st = job.status()
        assert st.adapt is not None and st.adapt.accepted == 60 * WORLD
        assert any(origin == "loss-softmax" for _, origin, _, _ in st.changes)
        assert st.adapt.group_weight[HOT] > 2 * np.median(st.adapt.group_weight)
        assert hot_tokens(got[-20:]) > 2 * hot_tokens(got[:10])
    finally:
        job.close()
    again = token_job(CheckpointStore(tmp_path / "state"))
    try:
        assert again.resumed_from is not None and again.resumed_from <= 60
        start = again.resumed_from
        replay = train(again, start, 60)
        for t, parts in zip(range(start, 60), replay):
            assert all(np.array_equal(a, b) for a, b in zip(parts, got[t])), t
    finally:
        again.close()


def test_a_token_exact_mixture_refuses_adapt_by_name() -> None:
    from croupier.server.job.adaptive import Adaptation

    class Fixed:  # what a token-exact mixture's dealer answers
        def source_tokens(self) -> None:
            return None

    with pytest.raises(ConfigError, match="--adapt on a token-exact mixture"):
        Adaptation.for_generator(AdaptSpec("loss-softmax", every=10), Fixed(), ClusterLayout.from_sizes(SIZES))
