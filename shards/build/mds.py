"""Read an existing MDS dataset (a local folder or any remote mosaicml-streaming supports).

`MDSSource` reads `index.json`, then one shard at a time: downloads it when remote (into a
private cache folder), checks its size and hashes against the index, decompresses it and
decodes samples with mosaicml-streaming's `MDSReader`. Only one decoded shard is held in
memory, so a sequential scan of a dataset far larger than RAM stays bounded. Every
failure (missing or unparsable index, missing shard, hash mismatch, bad compression,
unknown column) is a `DatasetError` naming the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import DatasetError
from croupier.format.mds_index import INDEX_BASENAME, MDSIndex, ShardEntry
from croupier.format.mds_shard import file_fault, split_samples


def is_remote(location: str) -> bool:
    return "://" in str(location)


class MDSSource:
    """Random and sequential access to the samples of an MDS dataset."""

    def __init__(self, location: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
                 verify: bool = True) -> None:
        self.location = str(location)
        self.remote = is_remote(self.location)
        self.verify = verify
        self._own_cache = False
        if self.remote:
            if cache_dir is None:
                cache_dir = tempfile.mkdtemp(prefix="croupier-mds-")
                self._own_cache = True
            self.local = Path(cache_dir)
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.local = Path(self.location)
            if not self.local.is_dir():
                raise DatasetError(f"MDS dataset folder {self.location!r} does not exist")
        self._cached: tuple[int, list[bytes]] | None = None
        try:
            self.index = MDSIndex(self._fetch_bytes(INDEX_BASENAME), self._name(INDEX_BASENAME))
            self.index.require_format("mds")
        except BaseException:
            self.close()  # a refused dataset leaves no download folder behind
            raise
        self.index_bytes = self.index.data
        self.shards: list[ShardEntry] = self.index.shards
        self.columns: list[str] = list(self.index.columns)

    # -- facts ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.index.num_samples

    def close(self) -> None:
        """Remove the private download cache (remote datasets only)."""
        self._cached = None
        if self._own_cache:
            shutil.rmtree(self.local, ignore_errors=True)
            self._own_cache = False

    def __enter__(self) -> MDSSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_column(self, name: str) -> None:
        if name not in self.columns:
            raise DatasetError(f"MDS dataset {self.location!r} has no column {name!r}; "
                               f"columns: {', '.join(self.columns) or 'none'}")

    # -- reading ---------------------------------------------------------------------------------
    def _name(self, basename: str) -> str:
        return f"{self.location.rstrip('/')}/{basename}"

    def _fetch_bytes(self, basename: str) -> bytes:
        local = self.local / basename
        if self.remote and not local.exists():
            from croupier.format.streaming_lib import CloudDownloader

            try:
                CloudDownloader.direct_download(self._name(basename), str(local))
            except Exception as exc:  # any backend failure: name the file
                raise DatasetError(f"cannot download {self._name(basename)}: {exc}") from exc
        try:
            return local.read_bytes()
        except FileNotFoundError as exc:
            raise DatasetError(f"{self._name(basename)} is missing") from exc
        except OSError as exc:
            raise DatasetError(f"{self._name(basename)} is unreadable: {exc}") from exc

    def _shard_samples(self, i: int) -> list[bytes]:
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        from croupier.format.streaming_lib import decompress

        entry = self.shards[i]
        stored = entry.stored
        data = self._fetch_bytes(stored.basename)
        if self.remote:
            (self.local / stored.basename).unlink(missing_ok=True)
        if self.verify:
            fault = file_fault(data, stored)
            if fault is not None:
                raise DatasetError(f"{self._name(stored.basename)} is corrupt: {fault}")
        if entry.zip is not None:
            try:
                data = decompress(entry.compression, data)
            except Exception as exc:
                raise DatasetError(f"{self._name(stored.basename)} cannot be decompressed: {exc}") from exc
        samples = split_samples(data, entry.samples, self._name(entry.raw.basename))
        self._cached = (i, samples)
        return samples

    def _reader(self, i: int) -> Any:
        from croupier.format.streaming_lib import MDSReader

        return MDSReader.from_json(str(self.local), None, self.shards[i].info)

    def get(self, ids: Sequence[int] | np.ndarray, column: str | None = None) -> list[Any]:
        """Samples (dicts), or one column of them, at the given global ids (any order)."""
        at = np.asarray(ids, dtype=np.int64)
        if len(at) and (at.min() < 0 or at.max() >= len(self)):
            raise DatasetError(f"sample id out of range [0, {len(self)})")
        shard_of, offsets = self.index.table.locate(at)
        out: list[Any] = [None] * len(at)
        for s in np.unique(shard_of):
            raw = self._shard_samples(int(s))
            reader = self._reader(int(s))
            for k in np.flatnonzero(shard_of == s):
                try:
                    sample = reader.decode_sample(raw[int(offsets[k])])
                except Exception as exc:
                    raise DatasetError(f"sample {int(at[k])} of {self.location!r} cannot be decoded: {exc}") from exc
                out[k] = sample if column is None else sample[column]
        return out

    def texts(self, lo: int, hi: int, column: str) -> list[str]:
        """Column `column` of samples [lo, hi), read shard by shard."""
        return self.get(np.arange(lo, hi), column)
