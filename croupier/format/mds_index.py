"""The MDS `index.json`: parsed and checked once, for the writer's and the reader's side alike.

mosaicml-streaming's index (format version 2) lists every shard with its sample count,
column names, compression and two file records: `raw_data` (the decompressed shard, which
readers open) and, for compressed shards, `zip_data` (what is stored and downloaded). Each
record carries the file's size in bytes and its hashes by algorithm. `MDSIndex` keeps the
raw bytes too, because the dataset fingerprint is taken over them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from croupier.errors import DatasetError
from croupier.format.fingerprint import index_fingerprint
from croupier.format.id_table import ShardTable

INDEX_BASENAME = "index.json"
INDEX_VERSION = 2
HASH_PREFERENCE = ("xxh3_64", "xxh64", "xxh3_128", "xxh128", "xxh32", "blake2b", "sha1", "md5",
                   "sha256", "sha512")
"""Hash algorithms to verify shard files with, fastest first."""


@dataclass(frozen=True)
class ShardFile:
    """One file of a shard as the index records it."""

    basename: str
    bytes: int
    hashes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardEntry:
    """One shard of the index: its files, sample count and columns."""

    info: dict[str, Any]
    """The shard's JSON object, verbatim (what streaming's `reader_from_json` takes)."""
    format: str
    samples: int
    compression: str | None
    columns: tuple[str, ...]
    raw: ShardFile
    zip: ShardFile | None

    @property
    def stored(self) -> ShardFile:
        """The file that lives on the remote: the compressed one when there is one."""
        return self.zip or self.raw

    @property
    def name(self) -> str:
        return self.stored.basename


def _file(obj: Any, what: str) -> ShardFile:
    if not isinstance(obj, dict) or not isinstance(obj.get("basename"), str) or "bytes" not in obj:
        raise ValueError(f"{what} is not a file record with basename and bytes")
    hashes = obj.get("hashes") or {}
    if not isinstance(hashes, dict):
        raise ValueError(f"{what} has hashes that are not a mapping")
    return ShardFile(basename=obj["basename"], bytes=int(obj["bytes"]), hashes=dict(hashes))


class MDSIndex:
    """A parsed, checked MDS index.json.

    data: the file's bytes; where: how to name it in errors (a path or URL).
    Raises DatasetError naming `where` when the bytes are not a version-2 index with at
    least one well-formed shard entry.
    """

    def __init__(self, data: bytes, where: str = INDEX_BASENAME) -> None:
        self.data = bytes(data)
        self.where = where
        try:
            obj = json.loads(self.data)
            if not isinstance(obj, dict):
                raise ValueError("it is not a JSON object")
            if obj.get("version") != INDEX_VERSION:
                raise ValueError(f"format version must be {INDEX_VERSION}, got {obj.get('version')!r}")
            shards = obj.get("shards")
            if not isinstance(shards, list) or not shards:
                raise ValueError("it lists no shards")
            entries = []
            for i, s in enumerate(shards):
                if not isinstance(s, dict) or "samples" not in s:
                    raise ValueError(f"shard {i} is not a shard entry with a sample count")
                samples = int(s["samples"])
                if samples < 0:
                    raise ValueError(f"shard {i} has a negative sample count {samples}")
                entries.append(ShardEntry(
                    info=s, format=str(s.get("format", "")), samples=samples,
                    compression=s.get("compression"), columns=tuple(s.get("column_names") or ()),
                    raw=_file(s.get("raw_data"), f"shard {i} raw_data"),
                    zip=_file(s["zip_data"], f"shard {i} zip_data") if s.get("zip_data") else None))
        except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
            raise DatasetError(f"{where} is not a valid MDS index: {exc}") from exc
        self.obj: dict[str, Any] = obj
        self.shards: list[ShardEntry] = entries
        self.table = ShardTable([e.samples for e in entries])

    @classmethod
    def read(cls, dataset_dir: str | os.PathLike[str]) -> MDSIndex:
        """The index of the local dataset folder `dataset_dir`."""
        root = Path(dataset_dir)
        path = root / INDEX_BASENAME
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"{str(root)!r} holds no MDS {INDEX_BASENAME}: not an MDS dataset") from None
        except OSError as exc:
            raise DatasetError(f"MDS index {str(path)!r} is unreadable: {exc.strerror}") from None
        return cls(data, str(path))

    # -- facts ---------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return index_fingerprint(self.data)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_samples(self) -> int:
        return self.table.num_samples

    @property
    def columns(self) -> tuple[str, ...]:
        return self.shards[0].columns

    def require_format(self, fmt: str) -> None:
        """Refuses shards of another streaming format (e.g. json or csv where mds is decoded)."""
        for i, e in enumerate(self.shards):
            if e.format != fmt:
                raise DatasetError(f"{self.where}: shard {i} is of format {e.format!r}, not {fmt!r}")

    def hash_algorithm(self, stored: bool = True) -> str | None:
        """The fastest hash algorithm every stored (`stored`) or raw file records, if any."""
        files: Iterable[ShardFile] = (e.stored if stored else e.raw for e in self.shards)
        return choose_hash(f.hashes for f in files)


def choose_hash(recorded: Iterable[Mapping[str, str]]) -> str | None:
    """The preferred algorithm that every one of the `recorded` hash maps holds and streaming knows."""
    from croupier.format.streaming_lib import get_hashes

    common: set[str] | None = None
    for hashes in recorded:
        common = set(hashes) if common is None else common & set(hashes)
    common = (common or set()) & get_hashes()
    for algo in HASH_PREFERENCE:
        if algo in common:
            return algo
    return min(common) if common else None
