"""The job's value types and errors: what its callers (the servicer, the CLI, tests) exchange with it.

Kept apart from `job.Job` so that the job's parts (`flow`, `changes`, `adaptive`, `status`,
`recovery`) and its callers can name them without importing the coordinator itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from croupier.errors import ConfigError, CroupierError
from croupier.server.durability.state_dir import StateDirInvalid

__all__ = ["CheckpointResult", "CheckpointUnavailable", "JobReformed", "JobSpec", "JoinResult", "NotJoined",
           "SliceData", "StateDirInvalid", "StepOutOfRange", "UnknownJob"]


class StepOutOfRange(CroupierError):
    """A step is negative, beyond the end of data, or further ahead than the server allows."""


class UnknownJob(CroupierError):
    """A request names a job this server does not serve."""


class NotJoined(CroupierError):
    """A rank calls before any rank has joined, so the job has no world yet."""


class JobReformed(CroupierError):
    """The job was re-formed (resume token, new world) while a rank's stream was open."""


class CheckpointUnavailable(CroupierError):
    """A checkpoint a caller asked for could not be written (the state directory refuses writes)."""


@dataclass(frozen=True)
class JobSpec:
    """What the operator fixes for a job besides the sampler itself."""

    name: str = "default"
    dataset_remote: str = ""
    dataset_fingerprint: str = ""
    selection: str = ""
    max_lag: int = 128
    max_lookahead: int = 64
    checkpoint_every: int = 1000
    snapshot_every: int = 32
    rank_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_lag < 1:
            raise ConfigError(f"max lag must be >= 1 step, got {self.max_lag}")
        if self.max_lookahead < 1:
            raise ConfigError(f"max lookahead must be >= 1 step, got {self.max_lookahead}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint interval must be >= 0 steps (0 = off), got {self.checkpoint_every}")
        if self.snapshot_every < 1:
            raise ConfigError(f"snapshot interval must be >= 1 step, got {self.snapshot_every}")
        if not self.rank_timeout_s > 0:
            raise ConfigError(f"rank liveness timeout must be > 0 seconds, got {self.rank_timeout_s}")


@dataclass(frozen=True)
class SliceData:
    """One rank's share of one step; `ids` is empty and `end` True past the end of data."""

    step: int
    ids: np.ndarray
    end: bool = False
    spans: np.ndarray | None = None  # steps in tokens: (start, end, length) per id, int64 (N, 3)


@dataclass(frozen=True)
class JoinResult:
    next_step: int
    per_rank_batch: int
    world: int


@dataclass(frozen=True)
class CheckpointResult:
    """A durable checkpoint: its token and step. `path` is for the server's own logs and
    operators' tools; it never goes to a rank."""

    token: str
    step: int
    path: str
    sampler_state: bytes = b""
    """The sampler state before `step` (`SamplerState.to_bytes()`), when asked for."""
