"""Shared by the unit and integration tests of one topic: B, CONFIG, SIZES, make_job."""

from __future__ import annotations

from croupier.layout import ClusterLayout
from croupier.server.durability.checkpoint_store import CheckpointStore
from croupier.server.job.job import Job, JobSpec
from croupier.server.sampling.policy import PolicyConfig

SIZES = [500, 60, 20, 3]


B = 8


CONFIG = PolicyConfig("clusterclip", clip=50)


def make_job(store: CheckpointStore | None = None, sizes=SIZES, **spec) -> Job:
    spec = {"max_lag": 8, "max_lookahead": 4, "checkpoint_every": 10, **spec}
    return Job(ClusterLayout.from_sizes(sizes), CONFIG, B, seed=0, spec=JobSpec(**spec), store=store)
