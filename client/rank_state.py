"""The position a trainer checkpoints with its model: a `RankClient`'s state dict.

    {"version": 1, "sampler_fingerprint": str, "next_step": int, "token": str}

Small, versioned and strict on load: a state of another version, or with a missing or
ill-typed field, is refused with the rule it breaks (`StateError`). `RankClient` and
`CroupierIterableDataset` both write and read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from croupier.errors import FingerprintMismatch, StateError

STATE_VERSION = 1
STATE_KEYS = ("version", "sampler_fingerprint", "next_step", "token")


def validate_state(state: Mapping[str, Any]) -> None:
    """Refuses a client state dict of another version or with missing/ill-typed fields."""
    if not isinstance(state, Mapping):
        raise StateError(f"client state must be a mapping, got {type(state).__name__}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise StateError(f"client state lacks {missing}; expected keys {list(STATE_KEYS)}")
    if state["version"] != STATE_VERSION:
        raise StateError(f"client state version {state['version']!r} is not supported (expected {STATE_VERSION})")
    if not isinstance(state["next_step"], int) or state["next_step"] < 0:
        raise StateError(f"client state next_step must be an int >= 0, got {state['next_step']!r}")
    if not isinstance(state["sampler_fingerprint"], str) or not state["sampler_fingerprint"]:
        raise StateError(f"client state sampler_fingerprint must be a non-empty string, got {state['sampler_fingerprint']!r}")
    if not isinstance(state["token"], str):
        raise StateError(f"client state token must be a string, got {type(state['token']).__name__}")


__all__ = ["STATE_KEYS", "STATE_VERSION", "validate_state"]


def check_same_job(first: Any, got: Any) -> None:
    """A server a rank re-joins (after a reconnect) must serve the same sampler and dataset as
    the JobInfo it first joined (FingerprintMismatch otherwise)."""
    if got.sampler_fingerprint != first.sampler_fingerprint:
        raise FingerprintMismatch("sampler (server after reconnect)", first.sampler_fingerprint,
                                  got.sampler_fingerprint)
    if got.dataset_fingerprint != first.dataset_fingerprint:
        raise FingerprintMismatch("dataset (server after reconnect)", first.dataset_fingerprint,
                                  got.dataset_fingerprint)
