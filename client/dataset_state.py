"""A `CroupierIterableDataset` state: its keys, its version, and the strict reading of one.

{"version", "sampler_fingerprint", "next_step", "skip", "stride", "stop_step", "token",
"sampler_state", "reader"}: the next step of the process's lane, samples of it already
yielded, the lane stride (workers), the iteration's end, a server checkpoint token, the sampler
state of the position (base64 text of `SamplerState.to_bytes()`: a resume costs O(clusters),
and the state moves between embedded and served jobs) and the shard readers' counters (for
logs; not read back). A `RankClient` state (a global next step) is read too.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from croupier.client.rank_state import STATE_VERSION, validate_state
from croupier.errors import StateError
from croupier.server.sampling.state import SamplerState

__all__ = ["DATASET_STATE_VERSION", "decode_sampler_state", "encode_sampler_state", "parse_sampler_state",
           "parse_state"]

DATASET_STATE_VERSION = 3
"""3 adds `sampler_state` (None, or the base64 text of `SamplerState.to_bytes()`: the state stays
JSON-serializable; raw bytes load too); states of version 2 load as before."""


def encode_sampler_state(data: bytes) -> str:
    """A sampler state as the dataset's state carries it: base64 text (JSON-safe)."""
    return base64.b64encode(data).decode("ascii")


def decode_sampler_state(value: str | bytes | bytearray | memoryview) -> bytes:
    """The bytes of a state's `sampler_state` (base64 text, or raw bytes)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise StateError("dataset state sampler_state is neither bytes nor base64 text") from None
_DATASET_STATE_KEYS = ("version", "sampler_fingerprint", "next_step", "skip", "stride", "stop_step", "token")


def parse_sampler_state(state: Mapping[str, Any], fingerprint: str | None, position: int | None) -> bytes | None:
    """A state's sampler state (bytes), checked: it reads back whole, names the state's
    sampler, and is at or before the state's next step."""
    data = state.get("sampler_state") if isinstance(state, Mapping) else None
    if data is None:
        return None
    if not isinstance(data, (bytes, bytearray, memoryview, str)):
        raise StateError(f"dataset state sampler_state must be base64 text, bytes or None, got {type(data).__name__}")
    data = decode_sampler_state(data)
    parsed = SamplerState.from_bytes(data)
    if fingerprint is not None and parsed.fingerprint != fingerprint:
        raise StateError(f"dataset state sampler_state belongs to sampler {parsed.fingerprint}, the state to "
                         f"{fingerprint}")
    if position is not None and parsed.step > position:
        raise StateError(f"dataset state sampler_state is at step {parsed.step}, past its next_step {position}")
    return data


def parse_state(state: Mapping[str, Any]) -> tuple[int | None, int, int | None, int | None]:
    """(next step, skip, stride, stop) of a dataset state, or of a RankClient state; strict."""
    if isinstance(state, Mapping) and state.get("version") == STATE_VERSION:
        validate_state(state)
        return int(state["next_step"]), 0, None, None
    if not isinstance(state, Mapping):
        raise StateError(f"dataset state must be a mapping, got {type(state).__name__}")
    missing = [k for k in _DATASET_STATE_KEYS if k not in state]
    if missing:
        raise StateError(f"dataset state lacks {missing}; expected keys {list(_DATASET_STATE_KEYS)}")
    if state["version"] not in (2, DATASET_STATE_VERSION):
        raise StateError(f"dataset state version {state['version']!r} is not supported "
                         f"(expected 2 or {DATASET_STATE_VERSION}, or a client state of version {STATE_VERSION})")

    def opt_int(key: str, low: int) -> int | None:
        value = state[key]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StateError(f"dataset state {key} must be None or an int >= {low}, got {value!r}")
        return int(value)

    position, stride, stop = opt_int("next_step", 0), opt_int("stride", 1), opt_int("stop_step", 0)
    skip = opt_int("skip", 0) or 0
    if not isinstance(state["sampler_fingerprint"], str) or not isinstance(state["token"], str):
        raise StateError("dataset state sampler_fingerprint and token must be strings, got "
                         f"{state['sampler_fingerprint']!r} and {type(state['token']).__name__}")
    if position is None and (skip or stride is not None):
        raise StateError(f"dataset state without next_step cannot have skip {skip} or stride {stride}")
    return position, skip, stride, stop
