"""The bytes of one MDS shard file: integrity against the index, and the sample header.

A decompressed MDS shard starts with a header of little-endian uint32s: the sample count
`n`, then `n + 1` offsets (from the start of the file) at which samples begin and the last
one ends (the writer's column config sits between the header and the first sample). `sample_offsets` decodes and checks that header, so a damaged shard is reported
as such, naming the file, instead of as an IndexError deep inside a reader.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

from croupier.errors import DatasetError

_HEADER_ITEM = 4


class FileRecord(Protocol):
    """A file as an index records it: `ShardFile`, or streaming's own `FileInfo`."""

    basename: str
    bytes: int
    hashes: Mapping[str, str]


def file_fault(data: bytes | memoryview, record: FileRecord, algorithms: Iterable[str] | None = None) -> str | None:
    """What is wrong with `data` as the file `record` describes, or None when it matches.

    Checks the size, then the hashes in `algorithms` (default: every algorithm recorded)."""
    from croupier.format.streaming_lib import get_hash

    if len(data) != record.bytes:
        return f"{len(data)} bytes, index.json says {record.bytes}"
    for algo in (record.hashes if algorithms is None else algorithms):
        want = record.hashes.get(algo)
        if want is None:
            continue
        got = get_hash(algo, bytes(data))
        if got != want:
            return f"{algo} expected {want}, got {got}"
    return None


def file_fault_at(path: str | os.PathLike[str], record: FileRecord, algorithm: str | None) -> str | None:
    """`file_fault` of a file on disk, checking only `algorithm` (size only when None)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "the file is missing"
    if size != record.bytes:
        return f"{size} bytes, index.json says {record.bytes}"
    if algorithm is None:
        return None
    with open(path, "rb") as f:
        return file_fault(f.read(), record, (algorithm,))


def header_bytes(samples: int) -> int:
    """Size of the header of an MDS shard of `samples` samples."""
    return _HEADER_ITEM * (samples + 2)


def sample_offsets(data: bytes | memoryview, samples: int, name: str, size: int | None = None) -> np.ndarray:
    """int64 (n + 1,) sample offsets of a decompressed MDS shard, after checking its header.

    data: the shard's bytes, or only its first `header_bytes(samples)` bytes with `size`, the
    file's full size. Raises DatasetError naming the shard when the header disagrees with the
    index's sample count or points outside the file."""
    size = len(data) if size is None else int(size)
    head = header_bytes(samples)
    if size < head or len(data) < head:
        raise DatasetError(f"shard {name} is corrupt: {size} bytes cannot hold the header of {samples} samples")
    n = int(np.frombuffer(data, "<u4", 1, 0)[0])
    if n != samples:
        raise DatasetError(f"shard {name} is corrupt: its header says {n} samples, index.json says {samples}")
    offs = np.frombuffer(data, "<u4", n + 1, _HEADER_ITEM).astype(np.int64)
    if offs[0] < head or offs[-1] != size or (np.diff(offs) < 0).any():
        raise DatasetError(f"shard {name} is corrupt: its sample offsets do not fit its {size} bytes")
    return offs


def header_fault_at(path: str | os.PathLike[str], samples: int, name: str) -> str | None:
    """What is wrong with the header of the decompressed MDS shard at `path`, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(header_bytes(samples))
            size = os.fstat(f.fileno()).st_size
        sample_offsets(head, samples, name, size)
    except DatasetError as exc:
        return str(exc)
    except OSError as exc:
        return f"shard {name} is unreadable: {exc.strerror}"
    return None


def split_samples(data: bytes, samples: int, name: str) -> list[bytes]:
    """The encoded samples of a decompressed MDS shard (see `sample_offsets`)."""
    offs = sample_offsets(data, samples, name).tolist()
    return [data[offs[j]:offs[j + 1]] for j in range(samples)]
