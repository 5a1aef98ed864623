"""Exponential backoff with jitter: how long a client waits before it retries the server.

One value object shared by a `RankClient`'s retry loops (its unary calls and its slice
stream), so a trainer configures its patience in one place.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from croupier.errors import ConfigError


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt k waits initial * 2**k (capped), times U(0.5, 1)."""

    initial_s: float = 0.05
    max_s: float = 2.0
    give_up_after_s: float = 300.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ConfigError(f"backoff needs 0 < initial_s <= max_s, got {self.initial_s}, {self.max_s}")
        if self.give_up_after_s <= 0:
            raise ConfigError(f"backoff give_up_after_s must be > 0, got {self.give_up_after_s}")

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * (2.0 ** min(attempt, 30))) * random.uniform(0.5, 1.0)


__all__ = ["Backoff"]
