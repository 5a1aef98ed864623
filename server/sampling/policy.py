"""Sampling policies and their configuration: a frozen, validated, serializable value.

Policies (after ClusterClip, "Balanced Data Sampling for Language Model Training with Clustering"; docs/sampling.md):
- random: plain shuffling; each epoch is one keyed permutation of every sample.
- uniform: every cluster equally likely, without replacement inside a cluster per pass, no clip.
- clusterclip: uniform over the clusters still active; a cluster is knocked out once its
  samples have been drawn `clip` times, and its mass is spread over the rest.
- g2s / s2g: random then cluster-uniform (general-to-specific), or the reverse, switching at
  `switch_step` or at `switch_fraction` of `budget_steps`.
- weighted: explicit per-cluster weights, optionally with a clip.

`on_exhausted` says what happens when every cluster is knocked out: "stop" raises
EndOfData, "random" continues with plain shuffling.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from croupier.errors import ConfigError

POLICIES: tuple[str, ...] = ("random", "uniform", "clusterclip", "g2s", "s2g", "weighted")
ON_EXHAUSTED: tuple[str, ...] = ("stop", "random")
_CLIPPED = ("clusterclip", "weighted")
_SWITCHING = ("g2s", "s2g")


@dataclass(frozen=True)
class PolicyConfig:
    """What the sampler draws. Validated at construction; see the module docstring."""

    policy: str
    clip: int | None = None
    auto_clip: bool = False
    weights: tuple[float, ...] | None = None
    switch_step: int | None = None
    switch_fraction: float | None = None
    budget_steps: int | None = None
    on_exhausted: str = "stop"
    min_active_share: float = 0.5

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"unknown policy {self.policy!r}; valid policies: {', '.join(POLICIES)}")
        if self.on_exhausted not in ON_EXHAUSTED:
            raise ConfigError(
                f"unknown on_exhausted {self.on_exhausted!r}; valid choices: {', '.join(ON_EXHAUSTED)}")
        if self.clip is not None:
            if isinstance(self.clip, bool) or not isinstance(self.clip, int) or self.clip < 1:
                raise ConfigError(f"clip must be an integer >= 1, got {self.clip!r}")
            if self.auto_clip:
                raise ConfigError(f"clip {self.clip} and auto clip are exclusive; give one")
        if (self.clip is not None or self.auto_clip) and self.policy not in _CLIPPED:
            raise ConfigError(
                f"policy {self.policy!r} takes no clip; the clip applies to {' and '.join(_CLIPPED)}")
        if self.policy == "clusterclip" and self.clip is None and not self.auto_clip:
            raise ConfigError("policy 'clusterclip' needs a clip threshold (an integer >= 1, or auto)")
        if self.budget_steps is not None and (not isinstance(self.budget_steps, int) or self.budget_steps < 1):
            raise ConfigError(f"budget_steps must be an integer >= 1, got {self.budget_steps!r}")
        if self.auto_clip and self.budget_steps is None:
            raise ConfigError("auto clip needs budget_steps: the clip is derived from the training budget")
        if not (0.0 < self.min_active_share <= 1.0):
            raise ConfigError(f"min_active_share must be in (0, 1], got {self.min_active_share}")
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
            check_weights(self.weights)
        if self.policy == "weighted" and self.weights is None:
            raise ConfigError("policy 'weighted' needs per-cluster weights")
        if self.policy != "weighted" and self.weights is not None:
            raise ConfigError(f"policy {self.policy!r} takes no weights; use policy 'weighted'")
        if self.policy in _SWITCHING:
            if (self.switch_step is None) == (self.switch_fraction is None):
                raise ConfigError(f"policy {self.policy!r} needs exactly one of switch_step or switch_fraction")
            if self.switch_step is not None and self.switch_step < 0:
                raise ConfigError(f"switch_step must be >= 0, got {self.switch_step}")
            if self.switch_fraction is not None:
                if not 0.0 <= self.switch_fraction <= 1.0:
                    raise ConfigError(f"switch_fraction must be in [0, 1], got {self.switch_fraction}")
                if self.budget_steps is None:
                    raise ConfigError("switch_fraction needs budget_steps to name a step")
        elif self.switch_step is not None or self.switch_fraction is not None:
            raise ConfigError(f"policy {self.policy!r} does not switch; switch_step/switch_fraction apply to g2s and s2g")

    @classmethod
    def from_options(cls, *, policy: str | None = None, clip: int | str | None = None,
                     weights: Sequence[float] | None = None, switch_step: int | None = None,
                     switch_fraction: float | None = None, budget_steps: int | None = None,
                     on_exhausted: str = "stop", min_active_share: float = 0.5,
                     clip_name: str = "clip") -> PolicyConfig:
        """A validated config from user-facing options: the one conversion `serve`, `simulate` and the
        Python APIs (`ClusterBatchSampler`) share, so a flag and a keyword mean the same thing.

        `policy` None means "clusterclip". `clip` is an integer >= 1, "auto" (derived from
        `budget_steps`, keeping `min_active_share` of the clusters active), the text of an integer
        (what a command line passes), or None. `clip_name` names the option in refusals ("--clip").
        """
        number: int | None = None
        auto = False
        if isinstance(clip, str):
            if clip == "auto":
                auto = True
            else:
                try:
                    number = int(clip)
                except ValueError:
                    raise ConfigError(f"{clip_name} must be an integer >= 1 or 'auto', got {clip!r}") from None
        elif isinstance(clip, numbers.Integral) and not isinstance(clip, bool):
            number = int(clip)
        elif clip is not None:
            raise ConfigError(f"{clip_name} must be an integer >= 1 or 'auto', got {clip!r}")
        if weights is not None:
            try:
                weights = tuple(weights)
            except TypeError:
                raise ConfigError(f"weights must be a sequence of numbers (one per cluster), got {weights!r}") from None
        return cls(policy=policy or "clusterclip", clip=number, auto_clip=auto, weights=weights,
                   switch_step=switch_step, switch_fraction=switch_fraction, budget_steps=budget_steps,
                   on_exhausted=on_exhausted, min_active_share=min_active_share)

    # -- derived ----------------------------------------------------------------------------
    @property
    def has_clip(self) -> bool:
        return self.clip is not None or self.auto_clip

    @property
    def switch_at(self) -> int | None:
        """The first step of the second phase of g2s/s2g; None for other policies."""
        if self.switch_step is not None:
            return self.switch_step
        if self.switch_fraction is not None and self.budget_steps is not None:
            return int(round(self.switch_fraction * self.budget_steps))
        return None

    def is_random_phase(self, step: int) -> bool:
        """Whether `step` draws by plain shuffling (True) or cluster-balanced (False)."""
        if self.policy == "random":
            return True
        if self.policy == "g2s":
            return step < (self.switch_at or 0)
        if self.policy == "s2g":
            return step >= (self.switch_at or 0)
        return False

    # -- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["weights"] is not None:
            d["weights"] = list(d["weights"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicyConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown policy config keys {unknown}; valid keys: {sorted(known)}")
        d = dict(d)
        if d.get("weights") is not None:
            d["weights"] = tuple(d["weights"])
        return cls(**d)

    def canonical_json(self) -> str:
        """Stable JSON used in fingerprints."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))


CLIP_PRODUCT_LIMIT = 2 ** 62
"""clip × total samples must stay below this: per-cluster room (clip × size) and its sums are int64."""


def check_clip(clip: int, total_samples: int) -> None:
    """A clip must be an integer >= 1 whose product with the dataset size fits the int64 arithmetic."""
    if isinstance(clip, bool) or not isinstance(clip, int) or clip < 1:
        raise ConfigError(f"clip must be an integer >= 1, got {clip!r}")
    if clip * int(total_samples) >= CLIP_PRODUCT_LIMIT:
        raise ConfigError(f"clip × total samples must be < 2**62 (int64 draw arithmetic); clip {clip} × "
                          f"{total_samples} samples = {clip * int(total_samples)}")


def check_weights(weights: tuple[float, ...] | list[float]) -> None:
    """Weights must be finite, >= 0, not all zero, and sum to a finite number (zero = excluded)."""
    if len(weights) == 0:
        raise ConfigError("weights must not be empty")
    for i, w in enumerate(weights):
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"weights must be finite and >= 0; weight {i} is {w}")
    if not any(w > 0 for w in weights):
        raise ConfigError("at least one weight must be > 0")
    total = 0.0
    for w in weights:  # the sampler's cumulative sum runs in this order
        total += w
    if not math.isfinite(total):
        raise ConfigError(f"weights must have a finite sum; they sum to {total} (largest weight {max(weights)})")
