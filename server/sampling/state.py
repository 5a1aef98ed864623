"""The sampler's whole state: small (O(clusters)), versioned, checksummed, strict on load.

Layout of `to_bytes()`:  MAGIC (8) | header length (u32 LE) | header JSON | arrays | crc32 (u32 LE)
The header holds the scalars, the fingerprint and the pending online changes; the arrays
are little-endian int64 (cursor, draws, clipped_at) and, when set, float64 weights. The
CRC-32 covers everything before it: it catches torn writes and bit rot (the server's state
files add their own SHA-256 on top), and keeps a 100k-cluster save + load in milliseconds.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from croupier.errors import StateError

MAGIC = b"CRPSTATE"
VERSION = 1


@dataclass(frozen=True)
class Change:
    """An online change that takes effect at the start of `step`.

    Single-source jobs use `clip` and `weights` (per cluster). Mixtures add `source` (a
    source index: `source_weight` and `clip` then apply to that source) and
    `source_weights` (every source's weight at once); `weights` is then per cluster of the
    mixture's combined cluster list. The mixture fields are written only when set, so a
    single-source change serializes as it always has.
    """

    step: int
    clip: int | None = None
    weights: tuple[float, ...] | None = None
    source: int | None = None
    source_weight: float | None = None
    source_weights: tuple[float, ...] | None = None
    origin: str = ""  # who made it ("operator" or a controller); does not affect the sequence
    global_tokens: int | None = None  # a job dealt in tokens: G from `step` on (the schedule's later points go)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"step": self.step, "clip": self.clip,
                             "weights": None if self.weights is None else list(self.weights)}
        if self.source is not None:
            d["source"] = self.source
        if self.source_weight is not None:
            d["source_weight"] = self.source_weight
        if self.source_weights is not None:
            d["source_weights"] = list(self.source_weights)
        if self.origin:
            d["origin"] = self.origin
        if self.global_tokens is not None:
            d["global_tokens"] = self.global_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Change:
        w = d.get("weights")
        sw = d.get("source_weights")
        return cls(step=int(d["step"]), clip=d.get("clip"), weights=None if w is None else tuple(w),
                   source=d.get("source"), source_weight=d.get("source_weight"),
                   source_weights=None if sw is None else tuple(sw), origin=str(d.get("origin", "")),
                   global_tokens=None if d.get("global_tokens") is None else int(d["global_tokens"]))


@dataclass(frozen=True, eq=False)
class SamplerState:
    """Everything needed to continue the global sequence exactly from `step`.

    cursor[c]: draws of cluster c by the cluster-balanced phases (pass = cursor // size).
    draws[c]: all draws of cluster c, random phases included (what ranks received).
    clipped_at[c]: step at which c was knocked out by the clip, -1 while active.
    random_cursor: position in the chain of keyed whole-dataset permutations (random phases).
    clip / weights: the values in force (after applied online changes).
    pending: online changes not yet applied, sorted by step.
    extra: a mixture's per-source part (weights, clips, share deficits, random cursors,
        exhausted-at steps), kept in the header; None for a single-source sampler.
    """

    fingerprint: str
    step: int
    random_cursor: int
    clip: int | None
    weights: np.ndarray | None
    cursor: np.ndarray
    draws: np.ndarray
    clipped_at: np.ndarray
    pending: tuple[Change, ...] = field(default=())
    extra: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        k = len(self.cursor)
        header = {
            "version": VERSION, "fingerprint": self.fingerprint, "step": self.step,
            "random_cursor": self.random_cursor, "clip": self.clip, "num_clusters": k,
            "has_weights": self.weights is not None,
            "pending": [c.to_dict() for c in self.pending],
        }
        if self.extra is not None:
            header["mix"] = self.extra
        hb = json.dumps(header, sort_keys=True).encode()
        arrays: list[tuple[np.ndarray, str]] = [(self.cursor, "<i8"), (self.draws, "<i8"), (self.clipped_at, "<i8")]
        if self.weights is not None:
            arrays.append((self.weights, "<f8"))
        head = len(MAGIC) + 4 + len(hb)
        buf = bytearray(head + 8 * k * len(arrays) + 4)
        buf[:head] = MAGIC + struct.pack("<I", len(hb)) + hb
        off = head
        for arr, dtype in arrays:  # one copy per array, straight into the buffer
            np.frombuffer(buf, dtype=dtype, count=k, offset=off)[:] = arr
            off += 8 * k
        view = memoryview(buf)
        struct.pack_into("<I", buf, off, zlib.crc32(view[:off]))
        return bytes(buf)

    @classmethod
    def from_bytes(cls, data: bytes) -> SamplerState:
        if len(data) < len(MAGIC) + 8 or data[:len(MAGIC)] != MAGIC:
            raise StateError(f"not a croupier sampler state (bad magic or {len(data)} bytes)")
        body, (crc,) = memoryview(data)[:-4], struct.unpack("<I", data[-4:])
        if zlib.crc32(body) != crc:
            raise StateError("sampler state checksum mismatch: the state is corrupt or truncated")
        (hlen,) = struct.unpack_from("<I", body, len(MAGIC))
        off = len(MAGIC) + 4
        try:
            header = json.loads(bytes(body[off:off + hlen]))
        except ValueError as exc:
            raise StateError(f"sampler state header is not valid JSON: {exc}") from None
        if header.get("version") != VERSION:
            raise StateError(f"sampler state version {header.get('version')} is not supported (this is {VERSION})")
        off += hlen
        k = int(header["num_clusters"])
        want = off + 3 * 8 * k + (8 * k if header["has_weights"] else 0)
        if len(body) != want:
            raise StateError(f"sampler state holds {len(body)} bytes, expected {want} for {k} clusters")
        # Read-only views into `data`, no copies: a sampler copies them on load_state.
        arrays = []
        for _ in range(3):
            arrays.append(np.frombuffer(body, dtype="<i8", count=k, offset=off))
            off += 8 * k
        weights = None
        if header["has_weights"]:
            weights = np.frombuffer(body, dtype="<f8", count=k, offset=off)
        return cls(fingerprint=header["fingerprint"], step=int(header["step"]),
                   random_cursor=int(header["random_cursor"]), clip=header["clip"], weights=weights,
                   cursor=arrays[0], draws=arrays[1], clipped_at=arrays[2],
                   pending=tuple(Change.from_dict(c) for c in header["pending"]), extra=header.get("mix"))
