"""An append-only binary log of online changes (weights, clip), replayable bit for bit.

Every online change — an operator's `croupier update`, or a controller's proposal — is one
record: the step at which it takes effect, a kind, its origin (who made it), the new clip
and/or the new float64 weights. A checkpoint references the log by record count
(`records_upto(n)`) instead of copying the changes, so a checkpoint stays O(clusters) however
many changes a run makes; a restarted server replays the first n records to rebuild the
schedule, and the sequence of every delivered step comes back exactly.

File layout (all little-endian):

    file header   MAGIC "CRPEVLG1" (8) | version u32
    record        payload length u32 | crc32(length field) u32 | payload | crc32(payload) u32
    payload       step i64 | clip i64 (-1 = none) | kind length u8 | kind utf-8 |
                  origin length u8 | origin utf-8 | encoding u8 | weight count u32 | body

Weights (encoding): 0 = none; 1 = the float64 bytes byte-shuffled (all first bytes, then all
second bytes ...) and zlib-compressed (level 1); 2 = the same of the XOR with the previous
weights of the same kind and length, chosen when fewer than half of the weights changed.
Both are lossless, so replay is bit-exact. Shuffling puts the exponent bytes and the unused low mantissa bytes side by side,
which zlib packs well; XOR leaves zeros wherever a weight did not change.

Measured size (`python -m bench.bench_feedback --scale full`, 100,000 weights a change;
sizes do not depend on machine load):
- a controller's change, every weight moved, shares rounded to 12 mantissa bits (the
  controllers' default `precision_bits`): 160 kB a change (1.6 bytes a weight), 160 MB for
  1,000 changes (written for real);
- the same at full float64 precision (`precision_bits=52`): 669 kB a change, 669 MB for
  1,000 (a float64 with 52 random mantissa bits hardly compresses);
- an operator's change of 100 of the weights (XOR-coded): 6.9 kB a change, 6.9 MB for 1,000.
docs/feedback.md has the table.

Durability: `append` writes one record with one `write`, then flushes and fsyncs the file
(and the directory when the file was created). A crash mid-append leaves a torn last record:
`scan` reports it (offset and bytes) and `EventLog` truncates it on open, so the log goes on
from the last whole record. A bad record anywhere before the last is corruption, refused
with a StateError naming the record and its offset: silently dropping changes would replay a
different sequence.

Order of operations (write-ahead): the job appends a change and only then schedules it, so
no delivered step ever depends on a change that is not whole in the log (a torn record was
never scheduled). A checkpoint stores the sampler state and `len(log)`; restoring loads the
state (changes before that count are in it) and schedules `iter_events(path, start=count)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from croupier.errors import ConfigError, StateError
from croupier.format.atomic import fsync_dir

MAGIC = b"CRPEVLG1"
VERSION = 1
HEADER = MAGIC + struct.pack("<I", VERSION)
ENC_NONE, ENC_SHUFFLE, ENC_XOR = 0, 1, 2
_REC_HEAD = struct.Struct("<II")      # payload length, crc32 of the length field
_FIXED = struct.Struct("<qq")         # step, clip
_MAX_PAYLOAD = 1 << 31
GENESIS = hashlib.sha256(b"croupier.events.v1").digest()
"""The digest of an empty log; record i's digest is sha256(digest before it + its payload)."""


def chain(digest: bytes, payload: bytes) -> bytes:
    """The running digest after one more record: it pins every record before it, in order."""
    return hashlib.sha256(digest + payload).digest()


@dataclass(frozen=True, eq=False)
class Event:
    """One online change, taking effect at the start of `step`.

    kind: what it changes, e.g. "weights" (cluster weights), "clip", "sources" (source
      weights of a mixture); free text up to 255 bytes, chosen by the job.
    origin: who made it, e.g. "operator" or a controller's name ("odm", "ado", ...).
    clip: the new clip, or None; weights: the new float64 weights, or None.
    """

    step: int
    kind: str
    origin: str
    clip: int | None = None
    weights: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, (int, np.integer)) or self.step < 0:
            raise ConfigError(f"an event's step must be an integer >= 0, got {self.step!r}")
        for name in ("kind", "origin"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v or len(v.encode()) > 255:
                raise ConfigError(f"an event's {name} must be a non-empty string of at most 255 bytes, got {v!r}")
        if self.clip is not None and (isinstance(self.clip, bool) or not isinstance(self.clip, (int, np.integer))
                                      or self.clip < 1):
            raise ConfigError(f"an event's clip must be an integer >= 1 or None, got {self.clip!r}")
        if self.weights is not None:
            w = np.ascontiguousarray(self.weights, dtype=np.float64)
            if w.ndim != 1 or w.size == 0:
                raise ConfigError(f"an event's weights must be a non-empty 1-D array, got shape {w.shape}")
            object.__setattr__(self, "weights", w)
        if self.clip is None and self.weights is None:
            raise ConfigError("an event needs a new clip or new weights")

    def same_as(self, other: Event) -> bool:
        """Equal fields, weights compared bit for bit."""
        if (self.step, self.kind, self.origin, self.clip) != (other.step, other.kind, other.origin, other.clip):
            return False
        if self.weights is None or other.weights is None:
            return self.weights is None and other.weights is None
        return self.weights.shape == other.weights.shape and bytes(self.weights.view(np.uint64)) == bytes(
            other.weights.view(np.uint64))


@dataclass(frozen=True)
class Scan:
    """What `scan` found: the whole records' count and end, and a torn tail if any."""

    records: int
    end: int                 # offset just after the last whole record
    torn_offset: int | None  # where the torn tail starts, None if the file ends cleanly
    torn_bytes: int          # bytes of the torn tail (0 if none)
    digests: tuple[bytes, ...] = ()  # the running digest after 0, 1, ... records (`chain`)


# -- encoding ---------------------------------------------------------------------------------
def _shuffle(b: np.ndarray) -> bytes:
    return zlib.compress(np.ascontiguousarray(b.view(np.uint8).reshape(-1, 8).T).tobytes(), 1)


def _unshuffle(body: bytes, n: int) -> np.ndarray:
    raw = zlib.decompress(body)
    if len(raw) != 8 * n:
        raise ValueError(f"weights body holds {len(raw)} bytes for {n} weights")
    return np.frombuffer(raw, dtype=np.uint8).reshape(8, n).T.copy().view("<u8").reshape(n)


def _encode(event: Event, prev: dict[str, np.ndarray]) -> bytes:
    kind, origin = event.kind.encode(), event.origin.encode()
    head = _FIXED.pack(int(event.step), -1 if event.clip is None else int(event.clip))
    head += bytes([len(kind)]) + kind + bytes([len(origin)]) + origin
    if event.weights is None:
        return head + struct.pack("<BI", ENC_NONE, 0)
    bits = event.weights.astype("<f8", copy=False).view("<u8")
    ref = prev.get(event.kind)
    if ref is not None and ref.size == bits.size:
        xor = bits ^ ref
        if np.count_nonzero(xor) * 2 < xor.size:  # a sparse change: the XOR is mostly zeros
            return head + struct.pack("<BI", ENC_XOR, bits.size) + _shuffle(xor)
    return head + struct.pack("<BI", ENC_SHUFFLE, bits.size) + _shuffle(bits)


def _decode(payload: bytes, prev: dict[str, np.ndarray]) -> Event:
    step, clip = _FIXED.unpack_from(payload, 0)
    off = _FIXED.size
    kl = payload[off]
    kind = payload[off + 1:off + 1 + kl].decode()
    off += 1 + kl
    ol = payload[off]
    origin = payload[off + 1:off + 1 + ol].decode()
    off += 1 + ol
    enc, n = struct.unpack_from("<BI", payload, off)
    off += 5
    weights = None
    if enc == ENC_SHUFFLE:
        bits = _unshuffle(payload[off:], n)
    elif enc == ENC_XOR:
        ref = prev.get(kind)
        if ref is None or ref.size != n:
            raise ValueError(f"XOR-coded weights of kind {kind!r} without previous weights of {n} entries")
        bits = _unshuffle(payload[off:], n) ^ ref
    elif enc == ENC_NONE:
        bits = None
    else:
        raise ValueError(f"unknown weights encoding {enc}")
    if bits is not None:
        prev[kind] = bits
        weights = bits.view("<f8").astype(np.float64)
    return Event(step=int(step), kind=kind, origin=origin, clip=None if clip < 0 else int(clip), weights=weights)


# -- reading ----------------------------------------------------------------------------------
def _records(data: bytes | memoryview | mmap.mmap, path: str) -> Iterator[tuple[int, bytes | None, Scan | None]]:
    """Yields (offset, payload, None) per whole record, then (end, None, Scan) once."""
    if len(data) < len(HEADER):
        if bytes(data) == HEADER[:len(data)]:  # torn while the header was written
            yield 0, None, Scan(records=0, end=0, torn_offset=0, torn_bytes=len(data))
            return
        raise StateError(f"{path} is not a croupier event log ({len(data)} bytes, bad header)")
    if bytes(data[:len(MAGIC)]) != MAGIC:
        raise StateError(f"{path} is not a croupier event log (bad magic {bytes(data[:len(MAGIC)])!r})")
    (version,) = struct.unpack_from("<I", data, len(MAGIC))
    if version != VERSION:
        raise StateError(f"{path}: event log version {version} is not supported (this is {VERSION})")
    off, n, size = len(HEADER), 0, len(data)
    while off < size:
        rest = size - off
        torn = Scan(records=n, end=off, torn_offset=off, torn_bytes=rest)
        if rest < _REC_HEAD.size:
            yield off, None, torn
            return
        length, lcrc = _REC_HEAD.unpack_from(data, off)
        if zlib.crc32(data[off:off + 4]) != lcrc or length > _MAX_PAYLOAD:
            if not any(bytes(data[off:])):  # a zero-filled tail: the file grew, the record never landed
                yield off, None, torn
                return
            raise StateError(f"{path}: event log record {n} at offset {off} has a corrupt header "
                             f"(length checksum mismatch); {rest} bytes follow it")
        end = off + _REC_HEAD.size + length + 4
        if end > size:
            yield off, None, torn
            return
        payload = bytes(data[off + _REC_HEAD.size:end - 4])
        (pcrc,) = struct.unpack_from("<I", data, end - 4)
        if zlib.crc32(payload) != pcrc:
            if end == size:
                yield off, None, torn
                return
            raise StateError(f"{path}: event log record {n} at offset {off} is corrupt (payload checksum "
                             f"mismatch) and {size - end} bytes of later records follow it")
        yield off, payload, None
        n += 1
        off = end
    yield off, None, Scan(records=n, end=off, torn_offset=None, torn_bytes=0)


@contextlib.contextmanager
def _mapped(path: str | os.PathLike[str]) -> Iterator[bytes | mmap.mmap]:
    """The file's bytes, memory-mapped (a log of many large changes is never read whole)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise StateError(f"event log {os.fspath(path)} does not exist") from None
    with f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            yield m


def scan(path: str | os.PathLike[str]) -> Scan:
    """Counts the whole records and finds a torn tail; raises StateError on corruption."""
    with _mapped(path) as data:
        return _scan(data, os.fspath(path), {})


def _scan(data: bytes | mmap.mmap, path: str, prev: dict[str, np.ndarray]) -> Scan:
    digests = [GENESIS]
    for off, payload, result in _records(data, path):
        if result is not None:
            return Scan(records=result.records, end=result.end, torn_offset=result.torn_offset,
                        torn_bytes=result.torn_bytes, digests=tuple(digests))
        assert payload is not None
        _checked_decode(payload, prev, path, off)
        digests.append(chain(digests[-1], payload))
    raise AssertionError("unreachable")


def whole_records(data: bytes) -> tuple[list[bytes], int | None, int]:
    """(payloads of the whole, checksum-valid records from the start, offset of the first bad
    or torn record or None, bytes from there to the end), never raising on damage: what a
    damaged copy still holds. A file without a valid header holds no records."""
    if len(data) < len(HEADER) or data[:len(MAGIC)] != MAGIC or data[:len(HEADER)] != HEADER:
        return [], (0 if data else None), len(data)
    out: list[bytes] = []
    off, size = len(HEADER), len(data)
    while off < size:
        if size - off < _REC_HEAD.size:
            return out, off, size - off
        length, lcrc = _REC_HEAD.unpack_from(data, off)
        end = off + _REC_HEAD.size + length + 4
        if zlib.crc32(data[off:off + 4]) != lcrc or length > _MAX_PAYLOAD or end > size:
            return out, off, size - off
        payload = data[off + _REC_HEAD.size:end - 4]
        if zlib.crc32(payload) != struct.unpack_from("<I", data, end - 4)[0]:
            return out, off, size - off
        out.append(payload)
        off = end
    return out, None, 0


def record_bytes(payload: bytes) -> bytes:
    """One record as the log stores it (length, its checksum, payload, its checksum)."""
    length = struct.pack("<I", len(payload))
    return length + struct.pack("<I", zlib.crc32(length)) + payload + struct.pack("<I", zlib.crc32(payload))


def decode_payloads(payloads: list[bytes], path: str) -> list[Event]:
    """The events of whole records (StateError when one passed its checksum but does not decode)."""
    prev: dict[str, np.ndarray] = {}
    return [_checked_decode(p, prev, path, i) for i, p in enumerate(payloads)]


def _checked_decode(payload: bytes, prev: dict[str, np.ndarray], path: str, off: int) -> Event:
    try:
        return _decode(payload, prev)
    except (ValueError, IndexError, struct.error, zlib.error, UnicodeDecodeError, ConfigError) as exc:
        raise StateError(f"{path}: event log record at offset {off} passed its checksum but does not "
                         f"decode: {exc}") from None


def iter_events(path: str | os.PathLike[str], start: int = 0, upto: int | None = None) -> Iterator[Event]:
    """The log's events in order: records [start, upto) (upto None = to the end; a torn tail
    is skipped).

    Every record is decoded (XOR-coded weights need their predecessors), only those from
    `start` on are yielded. Raises StateError on corruption, and when `start` or `upto` names
    more records than the log holds (a checkpoint that references changes the log lost)."""
    with _mapped(path) as data:
        yield from _events(data, os.fspath(path), start, upto)


def _events(data: bytes | mmap.mmap, path: str, start: int, upto: int | None) -> Iterator[Event]:
    prev: dict[str, np.ndarray] = {}
    n = 0
    need = max(start, upto or 0)
    for off, payload, result in _records(data, path):
        if upto is not None and n == upto:
            return
        if result is not None:
            if result.records < need:
                raise StateError(f"{path}: a checkpoint references {need} event log records but the log "
                                 f"holds {result.records} whole records" +
                                 (f" (torn tail of {result.torn_bytes} bytes at offset {result.torn_offset})"
                                  if result.torn_offset is not None else ""))
            return
        assert payload is not None
        event = _checked_decode(payload, prev, path, off)
        if n >= start:
            yield event
        n += 1


def records_upto(path: str | os.PathLike[str], n: int) -> list[Event]:
    """The first n events (what a checkpoint that references n records replays)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"a record count must be an integer >= 0, got {n!r}")
    return list(iter_events(path, upto=int(n)))


# -- writing ----------------------------------------------------------------------------------
class EventLog:
    """The append side of one log file; opens (creating it if needed) and repairs a torn tail.

    `torn` is the scan's torn tail found on open (None if the file ended cleanly); it was
    truncated away, so appends continue after the last whole record. Not thread-safe: the
    job appends under its own ordering. Use as a context manager or call `close()`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        created = not self.path.exists()
        self._prev: dict[str, np.ndarray] = {}
        self.torn: Scan | None = None
        self.digests: list[bytes] = [GENESIS]  # the running digest after 0, 1, ... records
        if created:
            self._file: BinaryIO = open(self.path, "xb")
            with self._closed_on_error():
                self._write_synced(HEADER)
                fsync_dir(self.path.parent)
            self._count = 0
            return
        with _mapped(self.path) as data:
            result = _scan(data, str(self.path), self._prev)
        self._count = result.records
        self.digests = list(result.digests)
        self._file = open(self.path, "r+b")
        with self._closed_on_error():
            if result.torn_offset is not None:
                self.torn = result
                end = max(result.end, 0)
                self._file.truncate(end)
                if end == 0:
                    self._file.seek(0)
                    self._write_synced(HEADER)
                os.fsync(self._file.fileno())
            self._file.seek(0, os.SEEK_END)

    @contextlib.contextmanager
    def _closed_on_error(self) -> Iterator[None]:
        """Closes the file when opening the log fails after the file was opened (a full or
        read-only disk refusing the header or the repair): no descriptor outlives the error."""
        try:
            yield
        except BaseException:
            self._file.close()
            raise

    def __len__(self) -> int:
        """Whole records in the log."""
        return self._count

    @property
    def digest(self) -> str:
        """The running digest of every record (hex): what the generated-step mark records."""
        return self.digests[-1].hex()

    def append(self, event: Event) -> int:
        """Writes one record durably (write, flush, fsync); returns its index (= records before it)."""
        prev = dict(self._prev)
        payload = _encode(event, prev)
        if len(payload) > _MAX_PAYLOAD:
            raise ConfigError(f"an event of {len(payload)} bytes exceeds the log's record limit {_MAX_PAYLOAD}")
        self._write_synced(record_bytes(payload))
        self.digests.append(chain(self.digests[-1], payload))
        if event.weights is not None:
            self._prev[event.kind] = event.weights.astype("<f8", copy=True).view("<u8")
        index = self._count
        self._count += 1
        return index

    def truncate_last(self, size: int) -> None:
        """Cuts the record just appended off again (the file was `size` bytes before it); best
        effort: a disk that refused the other copy may refuse this too (then a restart finds
        the record whole in one copy only, and keeps it)."""
        try:
            self._file.truncate(size)
            self._file.seek(0, os.SEEK_END)
            os.fsync(self._file.fileno())
        except OSError:
            return
        self._count -= 1
        self.digests.pop()

    def _write_synced(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
