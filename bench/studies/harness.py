"""The harness the training studies share: serve a sampler, stream its batches, train, evaluate.

A study (`bench.studies.train_compare` on a synthetic corpus, `bench.studies.train_natural`
on the docstrings of the installed packages) prepares a sharded corpus with its held-out
documents (`Prepared`) and a list of sampler configurations (`Variant`); `train_one` trains
the same tiny byte-level LM (croupier.apps.tinylm) on each through the real path (a sampler
server over gRPC in this process and the client's `CroupierIterableDataset` streaming the MDS
shards) and evaluates it per cluster (`RunResult`); `summarize` reduces the per-cluster losses:

    mean        mean over clusters of the held-out loss (nats per byte)
    worst25     mean of the worst quarter of clusters' held-out losses
    rare25      mean held-out loss over the rarest quartile of clusters (by training size)
    common25    mean held-out loss over the most common quartile
    rare_gap    held-out minus training loss on the rarest quartile (over-fitting)
    max_passes  the most passes the sampler made over any of its clusters

It is its own module so that each study imports it and neither imports the other's internals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


def single_thread_torch() -> None:
    """One torch thread: oversubscribed OpenMP threads spin and crawl on shared cores."""
    import torch

    torch.set_num_threads(1)


@dataclass(frozen=True)
class Variant:
    """One sampler configuration of the comparison (`build`: the natural mode's build it samples)."""

    name: str
    policy: dict
    build: str = ""
    adapt: str | None = None  # a controller (serve --adapt): the trainer reports per-example losses


@dataclass
class Prepared:
    """The sharded corpus and its evaluation sets."""

    dataset: Path
    layout: Any  # ClusterLayout the sampler draws from
    fingerprint: str  # dataset (MDS index) fingerprint
    num_clusters: int
    train_sizes: np.ndarray  # per cluster
    train_texts: list[str]  # one per sample id (dataset order)
    train_clusters: np.ndarray
    heldout_texts: list[str]
    heldout_clusters: np.ndarray
    build_s: float = 0.0


@dataclass
class RunResult:
    """One trained sampler: what it trained on and its per-cluster losses (`metrics`: `summarize`)."""

    name: str
    policy: dict
    steps: int
    examples: int
    train_s: float
    heldout_per_cluster: np.ndarray
    train_per_cluster: np.ndarray
    draws: np.ndarray
    clip: int | None
    final_train_loss: float
    metrics: dict[str, float] = field(default_factory=dict)
    ids: np.ndarray | None = None  # the sample ids trained on, in order
    seed: int = 0


def train_one(prep: Prepared, variant: Variant, *, steps: int, batch: int, cache: Path, seed: int = 0,
              lr: float = 3e-3, context: int = 64) -> RunResult:
    """Serve the variant's sampler over gRPC, stream its batches through the client, train, evaluate."""
    from croupier.apps.tinylm import (
        TinyLMConfig,
        build_model,
        encode,
        example_losses,
        make_optimizer,
        per_cluster_mean,
        train_step,
        train_step_losses,
    )
    from croupier.client.dataset import ID_KEY, STEP_KEY, CroupierIterableDataset
    from croupier.server.feedback.adapt import AdaptSpec
    from croupier.server.job.job import Job, JobSpec
    from croupier.server.sampling.policy import PolicyConfig
    from croupier.server.serving.service import create_server
    from croupier.topology import Topology

    config = PolicyConfig.from_dict(variant.policy)
    adapt = None if variant.adapt is None else AdaptSpec(variant.adapt, every=max(5, steps // 30))
    job = Job(prep.layout, config, batch, seed, adapt=adapt,
              spec=JobSpec(name="compare", dataset_remote=str(prep.dataset), dataset_fingerprint=prep.fingerprint))
    server, port = create_server(job, "127.0.0.1:0")
    cfg = TinyLMConfig(context=context)
    model = build_model(cfg, seed=seed)
    opt = make_optimizer(model, lr=lr)
    t0 = time.perf_counter()
    losses: list[float] = []
    try:
        ds = CroupierIterableDataset(f"127.0.0.1:{port}", "compare", cache_dir=cache, topology=Topology(0, 1),
                                     start_step=0, steps=steps, lookahead=16)
        texts: list[str] = []
        ids: list[int] = []
        current = None
        seen = 0
        def step_on(texts: list[str], step: int) -> float:
            if adapt is None:
                return train_step(model, opt, encode(texts, context))
            value, per = train_step_losses(model, opt, encode(texts, context))
            ds.report_losses(step, per)  # asynchronous: the server's controller learns from it
            return value

        for sample in ds:
            step = sample[STEP_KEY]
            if current is not None and step != current:
                losses.append(step_on(texts, current))
                texts = []
            current = step
            texts.append(sample["text"])
            seen += 1
            ids.append(int(sample[ID_KEY]))
        if texts and current is not None:
            losses.append(step_on(texts, current))
        ds.close()
        status = job.status()
    finally:
        server.stop(grace=0.5, checkpoint=False)
    train_s = time.perf_counter() - t0
    if len(losses) != steps or seen != steps * batch:
        raise RuntimeError(f"{variant.name}: trained {len(losses)} steps / {seen} examples, expected "
                           f"{steps} / {steps * batch}")
    k = prep.num_clusters
    held = per_cluster_mean(example_losses(model, encode(prep.heldout_texts, context)), prep.heldout_clusters, k)
    trn = per_cluster_mean(example_losses(model, encode(prep.train_texts, context)), prep.train_clusters, k)
    return RunResult(name=variant.name, policy=variant.policy, steps=steps, examples=seen, train_s=train_s,
                     heldout_per_cluster=held, train_per_cluster=trn, draws=np.asarray(status.draws),
                     clip=int(status.clip) or None, final_train_loss=float(np.mean(losses[-max(1, steps // 10):])),
                     ids=np.asarray(ids, dtype=np.int64), seed=seed)


def summarize(result: RunResult, sizes: np.ndarray, cluster_sizes: np.ndarray | None = None) -> dict[str, float]:
    """mean / worst25 / rare25 / common25 / rare_gap / max_passes (see the module docstring)
    over the clusters with held-out data.

    `sizes` are the training sizes of the evaluation groups; `cluster_sizes` those of the
    sampler's clusters (for max_passes) when they differ (the natural mode evaluates per true
    source while the sampler draws from croupier's clusters)."""
    held, trn = result.heldout_per_cluster, result.train_per_cluster
    ok = np.flatnonzero(~np.isnan(held))
    order = ok[np.argsort(sizes[ok], kind="stable")]  # rarest first
    q = max(1, len(order) // 4)
    rare, common = order[:q], order[-q:]
    worst = np.sort(held[ok])[-q:]
    return {
        "mean": float(np.mean(held[ok])),
        "worst25": float(np.mean(worst)),
        "rare25": float(np.mean(held[rare])),
        "common25": float(np.mean(held[common])),
        "rare_gap": float(np.mean(held[rare] - trn[rare])),
        "max_passes": float(np.max(result.draws / (sizes if cluster_sizes is None else cluster_sizes))),
    }
