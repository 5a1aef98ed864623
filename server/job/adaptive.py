"""A job's adaptive control: loss reports in, the controller's weights out as ordinary changes.

An adaptive job (`serve --adapt NAME`) keeps an `Adapter` (loss statistics per group and a
controller). Ranks report the losses of steps they were dealt; every `adapt_every` steps,
before the step is generated, the controller may propose new weights, which the job records
as an online change like an operator's (durable before any batch uses it). A controller
that fails is logged and counted; generation goes on.

`Adaptation` holds no lock: the job calls it under its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from croupier.errors import ConfigError
from croupier.layout import ClusterLayout
from croupier.server.feedback.adapt import Adapter, AdaptSpec
from croupier.server.feedback.loss_validation import ReportRefused, layout_group_of
from croupier.server.job.status import AdaptView
from croupier.server.job.types import SliceData
from croupier.server.sampling.mix_sampler import MixSampler
from croupier.server.sampling.sampler import Sampler
from croupier.server.sampling.state import Change

log = logging.getLogger(__name__)

__all__ = ["Adaptation", "LossSteps"]

LossSteps = list[tuple[int, np.ndarray, "np.ndarray | None"]]
"""A rank's loss report: (step, per-sample losses, presence mask or None) per step."""


class Adaptation:
    """The adapter of one job and what the job asks of it (see the module docstring)."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.failures = 0

    @classmethod
    def for_generator(cls, spec: AdaptSpec, gen: Sampler | MixSampler, layout: ClusterLayout) -> Adaptation:
        """The job's adapter: groups are clusters (any policy with clusters) or a mixture's sources.
        A job dealt in tokens adapts its document sampler (a token-exact mixture's shares are fixed)."""
        if hasattr(gen, "source_tokens"):
            raise ConfigError("--adapt on a token-exact mixture (unit = \"tokens\" dealt in tokens) is not supported: "
                              "its shares are fixed by the mixture file")
        gen = getattr(gen, "inner", gen)  # a TokenDealer's document sampler
        if spec.groups == "sources":
            if not isinstance(gen, MixSampler):
                raise ConfigError("--adapt-groups sources needs a mixture (serve --mix); this job serves one dataset")
            return cls(Adapter(spec, gen.source_of_ids, gen.source_counters().weights))
        if isinstance(gen, MixSampler):
            return cls(Adapter(spec, gen.cluster_of_ids, gen.cluster_weights(), source_of=gen.source_of_ids,
                               num_sources=len(gen.sources)))
        if gen.config.policy not in ("clusterclip", "weighted"):
            raise ConfigError(f"--adapt works with policy clusterclip or weighted (or a mixture), not "
                              f"{gen.config.policy!r}: the controller re-weights clusters")
        weights = np.ones(layout.num_clusters) if gen.config.weights is None else np.array(gen.config.weights)
        return cls(Adapter(spec, layout_group_of(layout), weights))

    # -- checkpoints --------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The checkpoint's adapter section."""
        return self.adapter.to_bytes()

    def load_bytes(self, data: bytes) -> None:
        """Restores a checkpoint's adapter section (StateError: another controller's, or damaged)."""
        self.adapter.load_bytes(data)

    # -- changes --------------------------------------------------------------------------------
    def note(self, change: Change) -> None:
        """Keeps the adapter's view of the weights in force (and the operator's prior) current."""
        a = self.adapter
        operator = not change.origin
        if a.spec.groups == "clusters" and change.weights is not None:
            a.note(np.array(change.weights), operator)
        elif a.spec.groups == "sources":
            if change.source_weights is not None:
                a.note(np.array(change.source_weights), operator)
            elif change.source is not None and change.source_weight is not None:
                w = a.weights.copy()
                w[change.source] = change.source_weight
                a.note(w, operator)

    def decide(self, step: int, high_water: int, record: Callable[[Change], None]) -> None:
        """Every `adapt_every` steps, before generating `step`: the controller's proposal, if
        any, becomes an ordinary change at `step` through `record` (the job's way of making a
        change durable and scheduling it; `step` is not generated yet, so it lies beyond every
        rank's lookahead). A failing controller or record is logged and counted, not raised."""
        a = self.adapter
        if step == 0 or step % a.spec.every:
            return
        if step < high_water:
            # Generated before a restart (up to the durable mark), perhaps delivered: the log
            # already holds whatever the controller decided then; deciding again would move it.
            return
        try:
            proposal = a.propose(step)
            if proposal is None:
                return
            w = tuple(float(x) for x in proposal)
            change = (Change(step=step, origin=a.spec.controller, source_weights=w) if a.spec.groups == "sources"
                      else Change(step=step, origin=a.spec.controller, weights=w))
            record(change)
        except Exception as exc:  # noqa: BLE001 - adaptation must never stall the sequence
            self.failures += 1
            log.error("adaptive weights not changed at step %d: %s", step, exc,
                      extra={"event": "adapt_failed", "step": step})
            return
        log.info("controller changed weights", extra={"event": "adapt", "step": step, "controller": a.spec.controller,
                                                      "reports": a.accepted})

    # -- loss reports ---------------------------------------------------------------------------
    def report(self, rank: int, dealt: int, steps: LossSteps,
               slice_of: Callable[[int], SliceData]) -> tuple[int, list[tuple[int, str, str]]]:
        """Folds a rank's per-sample losses of steps before `dealt` (what it was dealt) into the
        statistics; `slice_of(step)` is the rank's slice of a step. Returns (accepted,
        [(step, rule, message)] refused); a refused step changes nothing, the others count."""
        accepted, refused = 0, []
        for step, losses, present in steps:
            try:
                if step < 0 or step >= dealt:
                    raise ReportRefused("dealt", f"rank {rank} was never dealt step {step} (it has received "
                                                 f"steps before {dealt})")
                sl = slice_of(step)
                if sl.end:
                    raise ReportRefused("dealt", f"step {step} is past the end of data")
                tokens = None if sl.spans is None else sl.spans[:, 1] - sl.spans[:, 0]
                self.adapter.report(rank, step, sl.ids, losses, present, tokens)
                accepted += 1
            except ReportRefused as exc:
                self.adapter.refused += 1
                refused.append((int(step), exc.rule, str(exc)))
        return accepted, refused

    @staticmethod
    def log_refused(rank: int, refused: list[tuple[int, str, str]]) -> None:
        """Logs a report's refused steps (the caller does it outside its lock)."""
        if refused:
            log.warning("loss reports refused", extra={"event": "loss_refused", "rank": rank, "count": len(refused),
                                                       "first": refused[0][2]})

    # -- status -----------------------------------------------------------------------------------
    def view(self) -> AdaptView:
        a = self.adapter
        src = a.stats if a.spec.groups == "sources" else a.source_stats
        return AdaptView(spec=a.spec, accepted=a.accepted, refused=a.refused, samples=a.samples,
                         group_loss=a.stats.ema.copy(), group_samples=a.stats.samples.copy(),
                         group_weight=a.weights.copy(),
                         source_loss=None if src is None else src.ema.copy(),
                         source_samples=None if src is None else src.samples.copy())
