"""What a job shows of itself: the status snapshot, the adaptive view and the recent changes.

`JobStatus` is the one consistent snapshot GetStatus, the status table and the metrics read;
the job assembles it under its lock. `ChangeHistory` remembers the last online changes for
it (kind, origin, and how far each moved the weights against the previous change).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from croupier.server.durability.checkpoint_writer import WriterHealth
from croupier.server.feedback.adapt import AdaptSpec
from croupier.server.job.ranks import RankView
from croupier.server.sampling.mix_sampler import SourceCounters
from croupier.server.sampling.state import Change

__all__ = ["AdaptView", "ChangeHistory", "JobStatus"]

CHANGES_SHOWN = 64
"""Most recent online changes status shows."""


@dataclass(frozen=True, eq=False)
class AdaptView:
    """What status shows of an adaptive job: the spec, report counters and per-group figures."""

    spec: AdaptSpec
    accepted: int
    refused: int
    samples: int
    group_loss: np.ndarray
    group_samples: np.ndarray
    group_weight: np.ndarray
    source_loss: np.ndarray | None = None
    source_samples: np.ndarray | None = None


@dataclass(frozen=True)
class JobStatus:
    """A consistent snapshot for GetStatus, the status table and metrics."""

    generated_step: int
    durable_step: int
    slowest_step: int
    fastest_step: int
    world: int
    ranks: tuple[RankView, ...]
    active_clusters: int
    clip: int
    end_step: int | None
    sizes: np.ndarray
    draws: np.ndarray
    passes: np.ndarray
    clipped_at: np.ndarray
    steps_generated: int
    steps_replayed: int
    slices_served: int
    ids_served: int
    checkpoint: WriterHealth | None = None
    sources: SourceCounters | None = None
    adapt: AdaptView | None = None
    changes: tuple[tuple[int, str, str, float], ...] = ()
    log_failures: int = 0
    log_records: int = 0
    log_start: str = ""  # what the start found in the event log ("": no state directory)
    adapt_failures: int = 0
    tokens: np.ndarray | None = None
    tokens_since: int = 0


class ChangeHistory:
    """The last CHANGES_SHOWN online changes as (step, origin, kind, largest weight ratio).

    source_names: a mixture's source names (a source change shows its name), None for one dataset.
    """

    def __init__(self, source_names: Sequence[str] | None = None) -> None:
        self._names = None if source_names is None else tuple(source_names)
        self._rows: collections.deque[tuple[int, str, str, float]] = collections.deque(maxlen=CHANGES_SHOWN)
        self._last_w: dict[str, np.ndarray] = {}

    def note(self, change: Change) -> None:
        """Remembers a change: kind, origin, largest weight ratio against the last of its kind."""
        if change.source is not None:
            name = self._names[change.source] if self._names is not None else str(change.source)
            kind, w = f"source:{name}", None
        elif change.source_weights is not None:
            kind, w = "sources", np.array(change.source_weights)
        elif change.weights is not None:
            kind, w = "weights", np.array(change.weights)
        elif change.global_tokens is not None:
            kind, w = f"tokens:{change.global_tokens}", None
        else:
            kind, w = "clip", None
        ratio = 0.0
        if w is not None:
            prev = self._last_w.get(kind)
            if prev is not None and prev.shape == w.shape:
                a, b = w / max(w.sum(), 1e-300), prev / max(prev.sum(), 1e-300)
                both = (a > 0) & (b > 0)
                if both.any():
                    r = a[both] / b[both]
                    ratio = float(max(r.max(), 1.0 / r.min()))
            self._last_w[kind] = w
        self._rows.append((change.step, change.origin or "operator", kind, ratio))

    def rows(self) -> tuple[tuple[int, str, str, float], ...]:
        return tuple(self._rows)


def job_status(seq: Any, table: Any, durable_step: int, checkpoint: Any, changes: Any, adaptation: Any, tally: Any,
               slices_served: int, ids_served: int, log_start: str) -> JobStatus:
    """The job's `JobStatus` from its parts (taken under the job's lock)."""
    gen = seq.gen
    c = gen.counters()
    return JobStatus(
        generated_step=gen.step, durable_step=durable_step, slowest_step=table.slowest,
        fastest_step=table.fastest(), world=table.world or 0, ranks=table.views(),
        active_clusters=int(c.active.sum()), clip=int(gen.clip or 0), end_step=seq.end_step,
        sizes=c.sizes, draws=c.draws, passes=c.passes, clipped_at=c.clipped_at,
        steps_generated=seq.steps_generated, steps_replayed=seq.steps_replayed,
        slices_served=slices_served, ids_served=ids_served, checkpoint=checkpoint,
        sources=gen.source_counters() if hasattr(gen, "source_counters") else None,
        adapt=None if adaptation is None else adaptation.view(),
        changes=changes.history.rows(), log_failures=changes.failures,
        log_records=0 if changes.log is None else len(changes.log), log_start=log_start,
        adapt_failures=0 if adaptation is None else adaptation.failures,
        tokens=None if tally is None else tally.tokens.copy(), tokens_since=0 if tally is None else tally.since)
