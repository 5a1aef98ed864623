"""A job's adaptive weights: loss reports in, controller proposals out, as recorded changes.

`serve --adapt NAME --adapt-every N` gives the job an `Adapter`: ranks report per-sample
losses of the steps they trained (`ReportLoss`); the adapter checks each report against the
slice the rank was dealt, folds it into per-group statistics (`loss_stats.LossStats`; groups
are clusters, or a mixture's sources) and, every N generated steps, asks the controller
(`controllers`) for new weights. The job records a proposal as an ordinary online change at
a step not generated yet (so beyond every rank's lookahead) in its event log: the sequence
replays exactly from the log without the losses, and ClusterClip's clip keeps binding.

The statistics and the controller's state go into every checkpoint; reports received after
the last checkpoint are lost on a crash (at most checkpoint interval x ranks reports), which
only delays the controller.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from croupier.errors import ConfigError, StateError
from croupier.server.feedback.controllers import CONTROLLERS, make_controller
from croupier.server.feedback.loss_stats import LossStats
from croupier.server.feedback.loss_validation import ReportRefused, check_report

GROUPINGS: tuple[str, ...] = ("clusters", "sources")
REPORTED_WINDOW = 4096
"""Steps per rank remembered to refuse a second report of the same step."""
_MAGIC = b"CRPADPT1"


@dataclass(frozen=True)
class AdaptSpec:
    """What `--adapt` configures: controller name, interval, groups and parameters."""

    controller: str
    every: int
    groups: str = "clusters"
    params: dict[str, Any] = field(default_factory=dict)
    ema_decay: float = 0.9

    def __post_init__(self) -> None:
        if self.controller not in CONTROLLERS:
            raise ConfigError(f"unknown controller {self.controller!r}; valid controllers: {', '.join(sorted(CONTROLLERS))}")
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ConfigError(f"--adapt-every must be an integer >= 1 step, got {self.every!r}")
        if self.groups not in GROUPINGS:
            raise ConfigError(f"--adapt-groups must be one of {', '.join(GROUPINGS)}, got {self.groups!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"loss EMA decay must be in [0, 1), got {self.ema_decay}")
        make_controller(self.controller, **self.params)  # refuses unknown parameters by name

    def describe(self) -> dict[str, Any]:
        return {"controller": self.controller, "every": self.every, "groups": self.groups,
                "params": dict(self.params), "ema_decay": self.ema_decay}


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """`--adapt-param KEY=VALUE` pairs; values are numbers when they parse as numbers."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--adapt-param takes KEY=VALUE, got {item!r}")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def split_parts(data: bytes) -> list[bytes]:
    """The length-framed parts of an `Adapter.to_bytes` blob: header JSON, loss statistics,
    controller state, weights and (a mixture adapting clusters) per-source statistics."""
    if not data.startswith(_MAGIC):
        raise StateError("the checkpoint's adaptive-weights part is not one (bad magic)")
    parts, off = [], len(_MAGIC)
    while off + 8 <= len(data):
        (n,) = struct.unpack_from("<Q", data, off)
        parts.append(data[off + 8:off + 8 + n])
        off += 8 + n
    if len(parts) not in (4, 5) or off != len(data):
        raise StateError("the checkpoint's adaptive-weights part is truncated")
    return parts


class Adapter:
    """Statistics, controller and group mapping of one adaptive job (see the module docstring).

    group_of: maps sample ids to groups (raises ReportRefused for an id in no group).
    weights: the weights of the adapted kind in force at the start (ones when the policy has none).
    source_of / num_sources: a mixture adapting its clusters also keeps per-source statistics
        (for status; the controller sees the clusters').
    """

    def __init__(self, spec: AdaptSpec, group_of: Callable[[np.ndarray], np.ndarray], weights: np.ndarray,
                 source_of: Callable[[np.ndarray], np.ndarray] | None = None, num_sources: int = 0) -> None:
        self.spec = spec
        self.group_of = group_of
        self.weights = np.asarray(weights, dtype=np.float64).copy()
        self.stats = LossStats(len(self.weights), spec.ema_decay)
        self.source_of = source_of
        self.source_stats = LossStats(num_sources, spec.ema_decay) if source_of is not None else None
        self.controller = make_controller(spec.controller, **spec.params)
        self.accepted = 0
        self.refused = 0
        self.samples = 0
        self._reported: dict[int, deque[int]] = {}
        self._reported_sets: dict[int, set[int]] = {}

    @property
    def num_groups(self) -> int:
        return len(self.weights)

    def report(self, rank: int, step: int, ids: np.ndarray, losses: np.ndarray, present: np.ndarray | None,
               tokens: np.ndarray | None = None) -> None:
        """Checks and folds one step's report of a rank; raises ReportRefused (nothing changes).
        `tokens` (a job dealt in tokens): each id's tokens in the slice, the losses' weights."""
        seen = self._reported_sets.setdefault(rank, set())
        if step in seen:
            raise ReportRefused("duplicate", f"rank {rank} already reported step {step}")
        groups, values = check_report(ids, losses, self.group_of, present)
        keep = None if present is None else np.asarray(present, dtype=bool).reshape(-1)
        w = None if tokens is None else (tokens if keep is None else np.asarray(tokens)[keep])
        self.stats.add(step, groups, values, w)
        if self.source_stats is not None and self.source_of is not None:
            kept = ids if keep is None else np.asarray(ids)[keep]
            self.source_stats.add(step, self.source_of(np.asarray(kept, dtype=np.int64)), values, w)
        order = self._reported.setdefault(rank, deque())
        order.append(step)
        seen.add(step)
        while len(order) > REPORTED_WINDOW:
            seen.discard(order.popleft())
        self.accepted += 1
        self.samples += int(values.size)

    def propose(self, step: int) -> np.ndarray | None:
        """New weights for `step` (None: no change yet), from the statistics so far."""
        return self.controller.propose(self.stats, self.weights, step)

    def note(self, weights: np.ndarray, operator: bool) -> None:
        """Weights of the adapted kind were scheduled; an operator's become the prior."""
        self.weights = np.asarray(weights, dtype=np.float64).copy()
        if operator and (self.weights > 0).any():
            self.controller.set_prior(self.weights)

    # -- checkpoint ---------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        head = json.dumps({"accepted": self.accepted, "refused": self.refused, "samples": self.samples,
                           "spec": self.spec.describe()}, sort_keys=True).encode()
        parts = [head, self.stats.to_bytes(), self.controller.state_bytes(),
                 self.weights.astype("<f8").tobytes()]
        if self.source_stats is not None:
            parts.append(self.source_stats.to_bytes())
        return _MAGIC + b"".join(struct.pack("<Q", len(p)) + p for p in parts)

    def load_bytes(self, data: bytes) -> None:
        """Restores what `to_bytes` saved; refuses another controller's or a damaged blob."""
        parts = split_parts(data)
        head = json.loads(parts[0])
        if head["spec"]["controller"] != self.spec.controller or head["spec"]["groups"] != self.spec.groups:
            raise StateError(f"the state directory's adaptive weights come from controller "
                             f"{head['spec']['controller']!r} over {head['spec']['groups']}, this server runs "
                             f"{self.spec.controller!r} over {self.spec.groups}")
        stats = LossStats.from_bytes(parts[1])
        if stats.num_groups != self.num_groups:
            raise StateError(f"the checkpoint's loss statistics hold {stats.num_groups} groups, the job has "
                             f"{self.num_groups}")
        self.stats = stats
        self.controller.load_state_bytes(parts[2])
        self.weights = np.frombuffer(parts[3], dtype="<f8").astype(np.float64)
        self.accepted, self.refused, self.samples = int(head["accepted"]), int(head["refused"]), int(head["samples"])
        if self.source_stats is not None and len(parts) == 5:
            self.source_stats = LossStats.from_bytes(parts[4])
