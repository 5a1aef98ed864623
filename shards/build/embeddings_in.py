"""Embeddings from the user (`croupier shards build --embeddings FILE|FIELD`), read and validated.

Three sources, each giving one vector per document in the build's document order:

- a `.npy` file: a 2-D float array (float16/32/64), row i the embedding of document i in
  input order (the order `croupier shards build` reads its inputs: files as given, folders
  in sorted order, lines in order; with --skip-bad, the good records only);
- a `.parquet` file: a list<float> column (`--embeddings-column`, default `embedding`); with
  `--embeddings-key FIELD` the file's FIELD column must equal the records' FIELD, row by row,
  so a file written in another order is refused at the first differing row;
- a field of the records (any other value): a list of numbers in every record.

Every vector must have the same dimension, finite values that fit float16 (the sidecar stores
float16). A count that differs from the documents is refused naming both numbers. What the
vectors came from (file name and SHA-256, or the field) is the `provenance` the manifest keeps.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError

FLOAT16_MAX = float(np.finfo(np.float16).max)
FILE_SUFFIXES = (".npy", ".parquet")
DEFAULT_COLUMN = "embedding"


def is_file_source(value: str) -> bool:
    """Whether `--embeddings VALUE` names a file (.npy/.parquet) rather than a field of the records."""
    return value.lower().endswith(FILE_SUFFIXES)


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_rows(rows: np.ndarray, first: int, what: str, dim: int | None = None) -> np.ndarray:
    """float32 copy of a (m, d) block of vectors starting at document `first`, or a one-line refusal."""
    try:
        block = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DatasetError(f"{what}: the vectors from document {first} on are not numbers ({exc})") from None
    if block.ndim != 2:
        raise DatasetError(f"{what}: expected one vector per document (a 2-D array), got shape {block.shape}")
    if block.shape[1] < 1 or (dim is not None and block.shape[1] != dim):
        raise DatasetError(f"{what}: document {first} has a vector of dimension {block.shape[1]}, "
                           f"expected {dim if dim is not None else '>= 1'}")
    bad = ~np.isfinite(block) | (np.abs(block) > FLOAT16_MAX)
    if bad.any():
        r, c = (int(x) for x in np.argwhere(bad)[0])
        raise DatasetError(f"{what}: document {first + r} has the value {block[r, c]} at dimension {c}, "
                           f"not a finite number within float16's range (+-{FLOAT16_MAX:g})")
    return block.astype(np.float32)


def length_mismatch(what: str, got: int, docs: int, skipped: int = 0) -> DatasetError:
    note = f" ({skipped} bad records were skipped: give vectors for the good records only)" if skipped else ""
    return DatasetError(f"{what} holds {got} embeddings but the inputs hold {docs} documents{note}: "
                        "one vector per document, in input order")


class NpySource:
    """A `.npy` matrix, memory-mapped, one row per document."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.what = f"--embeddings {path}"
        if not self.path.is_file():
            raise ConfigError(f"{self.what}: no such file")
        try:
            self.array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self.what} is not a readable .npy array: {exc}") from None
        if self.array.ndim != 2 or self.array.dtype.kind != "f":
            raise DatasetError(f"{self.what} must be a 2-D float array (N, dim), got {self.array.dtype} "
                               f"{self.array.shape}")

    def check_count(self, docs: int, skipped: int = 0) -> None:
        if len(self.array) != docs:
            raise length_mismatch(self.what, len(self.array), docs, skipped)

    def blocks(self, chunk: int) -> Iterator[np.ndarray]:
        for lo in range(0, len(self.array), chunk):
            yield check_rows(self.array[lo:lo + chunk], lo, self.what, int(self.array.shape[1]))

    def provenance(self) -> dict[str, Any]:
        return {"from": "file", "file": self.path.name, "path": str(self.path.resolve()),
                "sha256": file_sha256(self.path), "dtype": str(self.array.dtype), "rows": int(len(self.array))}


class ParquetSource:
    """A list<float> column of a Parquet file, optionally keyed against a field of the records."""

    def __init__(self, path: str, column: str | None, key: str | None) -> None:
        from croupier.optional import require

        pq = require("pyarrow.parquet", "reading --embeddings FILE.parquet")
        self.path = Path(path)
        self.column = column or DEFAULT_COLUMN
        self.key = key
        self.what = f"--embeddings {path} (column {self.column!r})"
        if not self.path.is_file():
            raise ConfigError(f"--embeddings {path}: no such file")
        try:
            self.file = pq.ParquetFile(self.path)
        except Exception as exc:
            raise DatasetError(f"--embeddings {path} is not a readable Parquet file: {exc}") from None
        names = self.file.schema_arrow.names
        for col in (self.column, *([key] if key else [])):
            if col not in names:
                raise DatasetError(f"--embeddings {path} has no column {col!r} (columns: {', '.join(names)})")
        self.rows = int(self.file.metadata.num_rows)

    def check_count(self, docs: int, skipped: int = 0) -> None:
        if self.rows != docs:
            raise length_mismatch(self.what, self.rows, docs, skipped)

    def blocks(self, chunk: int) -> Iterator[np.ndarray]:
        lo, dim = 0, None
        for batch in self.file.iter_batches(batch_size=chunk, columns=[self.column]):
            values = batch.column(0).to_pylist()
            if any(v is None for v in values):
                i = next(j for j, v in enumerate(values) if v is None)
                raise DatasetError(f"{self.what}: document {lo + i} has no vector (null)")
            try:
                block = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                raise DatasetError(f"{self.what}: the vectors from document {lo} on differ in dimension "
                                   "or are not lists of numbers") from None
            out = check_rows(block, lo, self.what, dim)
            dim = out.shape[1]
            lo += len(out)
            yield out

    def check_keys(self, record_keys: Callable[[], Iterator[Any]]) -> None:
        """Refuse a file whose key column differs from the records' key field, naming the first row."""
        if self.key is None:
            return
        theirs = (v for batch in self.file.iter_batches(batch_size=8192, columns=[self.key])
                  for v in batch.column(0).to_pylist())
        for i, (mine, given) in enumerate(zip(record_keys(), theirs)):
            if mine != given:
                raise DatasetError(f"{self.what}: row {i} has {self.key} {given!r} but document {i} of the inputs "
                                   f"has {mine!r}: the file is not in input order (or holds other records)")

    def provenance(self) -> dict[str, Any]:
        return {"from": "file", "file": self.path.name, "path": str(self.path.resolve()),
                "sha256": file_sha256(self.path), "column": self.column, "key": self.key, "rows": self.rows}


class FieldSource:
    """A list-of-numbers field of every record; `records()` yields its value per document, in order."""

    def __init__(self, field: str, records: Callable[[], Iterator[Any]], docs: int) -> None:
        self.field = field
        self.what = f"--embeddings field {field!r}"
        self.records = records
        self.docs = docs

    def check_count(self, docs: int, skipped: int = 0) -> None:
        pass  # counted while reading: `blocks` refuses a different number of records

    def blocks(self, chunk: int) -> Iterator[np.ndarray]:
        buf: list[Any] = []
        lo, dim, seen = 0, None, 0
        for value in self.records():
            seen += 1
            if not isinstance(value, (list, tuple, np.ndarray)):
                raise DatasetError(f"{self.what}: document {seen - 1} holds a {type(value).__name__}, not a list "
                                   "of numbers")
            buf.append(value)
            if len(buf) == chunk:
                out = self._block(buf, lo, dim)
                dim, lo, buf = out.shape[1], lo + len(out), []
                yield out
        if buf:
            yield self._block(buf, lo, dim)
        if seen != self.docs:
            raise length_mismatch(self.what, seen, self.docs)

    def _block(self, buf: list[Any], lo: int, dim: int | None) -> np.ndarray:
        lengths = {len(v) for v in buf}
        if len(lengths) > 1 or (dim is not None and lengths != {dim}):
            want = dim if dim is not None else len(buf[0])
            i = next(j for j, v in enumerate(buf) if len(v) != want)
            raise DatasetError(f"{self.what}: document {lo + i} has a vector of dimension {len(buf[i])}, "
                               f"expected {want}")
        return check_rows(np.asarray(buf, dtype=np.float64), lo, self.what, dim)

    def provenance(self) -> dict[str, Any]:
        return {"from": "field", "field": self.field}
