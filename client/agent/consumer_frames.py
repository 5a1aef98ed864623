"""The node agent's reading of a consumer's message: every frame checked before it is used.

A consumer's message (`croupier.client.agent.protocol` lists the kinds) comes from any
process of the node that can reach the agent's socket. The agent serves the node's other
consumers whatever one of them sends, so a malformed message is refused like a malformed
request to the server: `parse` returns the message's parts or raises `BadFrame`, which names
the rule broken and carries the request id to answer (when the message had one). The agent
answers a `BadFrame` with an INVALID_ARGUMENT reply and counts it; nothing malformed reaches
a task of the agent.

A session message's lane opens and acknowledgements are checked one by one (`bad_opens`,
`bad_acks`): a bad one is refused on its own lane (an error event, as the server refuses a
lane), the others of the message go on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError

from croupier.client.agent.protocol import CALL, FETCH, HELLO, SESSION
from croupier.proto import pb2

__all__ = ["MAX_FETCH_SHARDS", "MAX_METHOD_CHARS", "BadFrame", "Call", "Fetch", "Hello", "Session", "bad_acks",
           "bad_opens", "parse"]

MAX_METHOD_CHARS = 64
"""Longest method name a CALL may carry (the forwarded calls' names are far shorter)."""
MAX_FETCH_SHARDS = 1 << 20
"""Most shard ids one FETCH may name (a step's shards are a few thousand at most)."""
MAX_SOURCE = 1 << 16
"""Largest mixture source index a FETCH may name."""
_SHOWN = 40
"""Bytes of a bad value shown in a refusal."""


class BadFrame(ValueError):
    """A consumer message that breaks the protocol: `req_id` (b"" when it had none) is what
    the refusal answers; the message names the rule and the bad value."""

    def __init__(self, message: str, req_id: bytes = b"") -> None:
        super().__init__(message)
        self.req_id = req_id


@dataclass(frozen=True)
class Hello:
    req_id: bytes


@dataclass(frozen=True)
class Call:
    req_id: bytes
    method: str
    payload: bytes


@dataclass(frozen=True)
class Session:
    request: pb2.SessionRequest


@dataclass(frozen=True)
class Fetch:
    req_id: bytes
    shards: np.ndarray
    source: int | None


Message = Hello | Call | Session | Fetch


def _shown(value: bytes) -> str:
    return repr(value[:_SHOWN]) + ("..." if len(value) > _SHOWN else "")


def _frames(kind: str, frames: list[bytes], least: int, most: int) -> bytes:
    """Checks the frame count of a message of `kind`; returns its request id (frame 1)."""
    req_id = frames[1] if len(frames) > 1 else b""
    if not least <= len(frames) <= most:
        want = str(least) if least == most else f"{least} to {most}"
        raise BadFrame(f"a {kind} message has {want} frames, got {len(frames)}", req_id)
    return req_id


def parse(frames: list[bytes]) -> Message:
    """The consumer message `frames` (without the sender's identity); BadFrame when malformed."""
    if not frames:
        raise BadFrame("an empty consumer message (no kind frame)")
    kind = frames[0]
    if kind == HELLO:
        return Hello(_frames("HELLO", frames, 2, 2))
    if kind == CALL:
        req_id = _frames("CALL", frames, 4, 4)
        raw = frames[2]
        if len(raw) > MAX_METHOD_CHARS:
            raise BadFrame(f"a CALL's method name is at most {MAX_METHOD_CHARS} bytes, got {len(raw)}", req_id)
        try:
            method = raw.decode("ascii")
        except UnicodeDecodeError:
            raise BadFrame(f"a CALL's method name must be ASCII, got {_shown(raw)}", req_id) from None
        return Call(req_id, method, frames[3])
    if kind == SESSION:
        _frames("SESSION", frames, 2, 2)
        try:
            return Session(pb2.SessionRequest.FromString(frames[1]))
        except DecodeError:
            raise BadFrame(f"a SESSION message must carry a SessionRequest; {len(frames[1])} bytes do not parse "
                           f"as one ({_shown(frames[1])})") from None
    if kind == FETCH:
        req_id = _frames("FETCH", frames, 3, 4)
        payload = frames[2]
        if len(payload) % 8:
            raise BadFrame(f"a FETCH's shard ids are little-endian int64 (a multiple of 8 bytes), got "
                           f"{len(payload)} bytes", req_id)
        if len(payload) // 8 > MAX_FETCH_SHARDS:
            raise BadFrame(f"a FETCH names at most {MAX_FETCH_SHARDS} shards, got {len(payload) // 8}", req_id)
        shards = np.frombuffer(payload, dtype="<i8")
        if shards.size and int(shards.min()) < 0:
            raise BadFrame(f"a FETCH's shard ids must be >= 0, got {int(shards.min())}", req_id)
        source = None
        if len(frames) == 4:
            raw = frames[3]
            if not (0 < len(raw) <= 5 and raw.isdigit() and int(raw) <= MAX_SOURCE):
                raise BadFrame(f"a FETCH's source is a decimal index in [0, {MAX_SOURCE}], got {_shown(raw)}",
                               req_id)
            source = int(raw)
        return Fetch(req_id, shards, source)
    raise BadFrame(f"unknown consumer message kind {_shown(kind)} (the agent takes hello, call, session, fetch)",
                   frames[1] if len(frames) > 1 else b"")


def _open_fault(op: pb2.LaneOpen) -> str:
    """What is wrong with a lane open ("" when nothing): the bounds the server holds it to."""
    stride = max(int(op.step_stride), 1)
    if op.world_size < 1:
        return f"world size must be >= 1, got {op.world_size}"
    if not 0 <= op.rank < op.world_size:
        return f"rank {op.rank} is outside [0, world size {op.world_size})"
    if op.start_step < 0:
        return f"start step must be >= 0, got {op.start_step}"
    if op.stop_step < 0:
        return f"stop step must be >= 0 (0 = no stop), got {op.stop_step}"
    if op.lookahead < 0:
        return f"lookahead must be >= 0, got {op.lookahead}"
    if op.step_stride < 0:
        return f"step stride must be >= 0, got {op.step_stride}"
    if not 0 <= op.step_offset < stride:
        return f"step offset {op.step_offset} is outside [0, step stride {stride})"
    if op.rank_count < 0 or (op.rank_count > 1 and op.rank + op.rank_count > op.world_size):
        return (f"rank count {op.rank_count} must be >= 0 and its ranks lie in the world "
                f"(rank {op.rank}, world size {op.world_size})")
    return ""


def bad_opens(req: pb2.SessionRequest) -> list[pb2.LaneEvent]:
    """Removes the malformed lane opens from `req`; returns an INVALID_ARGUMENT event for each."""
    kept, refused = [], []
    for op in req.open:
        fault = _open_fault(op)
        if fault:
            refused.append(pb2.LaneEvent(lane=op.lane, error_code="INVALID_ARGUMENT",
                                         error=f"lane {op.lane} refused by the node agent: {fault}"))
        else:
            kept.append(op)
    if refused:
        del req.open[:]
        req.open.extend(kept)
    return refused


def bad_acks(req: pb2.SessionRequest) -> list[pb2.LaneEvent]:
    """Removes the acknowledgements of a negative step from `req` and closes their lanes (an
    error event closes its lane); returns an INVALID_ARGUMENT event for each."""
    kept, refused = [], []
    for a in req.acks:
        if a.next_step >= 0 and all(s >= 0 for s in a.rank_steps):
            kept.append(a)
            continue
        low = min([a.next_step, *a.rank_steps])
        refused.append(pb2.LaneEvent(lane=a.lane, error_code="INVALID_ARGUMENT",
                                     error=f"lane {a.lane} closed by the node agent: an acknowledged step must be "
                                           f">= 0, got {low}"))
    if refused:
        del req.acks[:]
        req.acks.extend(kept)
        req.close.extend(sorted({e.lane for e in refused} - set(req.close)))
    return refused
