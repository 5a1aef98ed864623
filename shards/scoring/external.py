"""Scores the user already has: `croupier shards score --from-field FIELD | --from-file FILE`.

A kept field of the dataset (an MDS column: a DCLM fastText probability, a FineWeb-Edu
grade, a perplexity from the user's own model...), a `.npy` file with one number per sample
id, or a Parquet column (`--column`; row i for sample id i, or joined on a kept field with
`--key FIELD`, which is how scores made in input order reach a cluster-major dataset, whose
sample ids are in cluster order) becomes a float32 score column of the sidecar, named after
the field (or the column, or the file's stem) unless `--name` says otherwise. Its record in the manifest says where it came from (the field,
or the file's name and SHA-256) and which way is better (`higher_is_better`, true unless
`--lower-is-better`), so `croupier shards select --by NAME --keep F | --threshold T` keeps
its best samples (`croupier.shards.scoring.subset`). Missing, non-numeric or non-finite
values are refused naming the first sample that has one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError

SCORER = "external"
"""The `scorer` an external score column records."""
READ_CHUNK = 8192


def dataset_location(sidecar: Any) -> str:
    """Where the sidecar's shards are: beside it, or the remote it was adopted from."""
    return str(sidecar.remote or sidecar.root)


def kept_fields(sidecar: Any) -> list[str]:
    """The dataset's MDS columns."""
    from croupier.format.mds_index import MDSIndex

    if sidecar.remote:
        from croupier.shards.build.mds import MDSSource

        with MDSSource(dataset_location(sidecar)) as source:
            return list(source.columns)
    return list(MDSIndex.read(Path(sidecar.root)).columns)


def read_column(sidecar: Any, field: str) -> list[Any]:
    """Every sample's value of an MDS column, in sample-id order."""
    from croupier.shards.build.mds import MDSSource

    with MDSSource(dataset_location(sidecar)) as source:
        source.require_column(field)
        n = len(source)
        if n != sidecar.num_samples:
            raise DatasetError(f"the MDS index lists {n} samples but the sidecar {sidecar.num_samples}")
        out: list[Any] = []
        for lo in range(0, n, READ_CHUNK):
            out.extend(source.texts(lo, min(n, lo + READ_CHUNK), field))
    return out


def numbers(values: Sequence[Any], what: str) -> np.ndarray:
    """float32 (n,) of numeric values; refuses the first missing, non-numeric or non-finite one."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if isinstance(v, np.ndarray) and v.shape == ():
            v = v.item()
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise DatasetError(f"{what}: sample {i} holds {v!r} ({type(v).__name__}), not a number")
        if not math.isfinite(float(v)) or abs(float(v)) > float(np.finfo(np.float32).max):
            raise DatasetError(f"{what}: sample {i} holds {v!r}, not a finite float32 number")
        out[i] = float(v)
    return out.astype(np.float32)


def from_field(sidecar: Any, field: str) -> tuple[np.ndarray, dict[str, Any]]:
    """A kept field's values as scores, and where they came from."""
    fields = kept_fields(sidecar)
    if field not in fields:
        raise ConfigError(f"--from-field {field!r} is not a kept field of {str(sidecar.root)!r} "
                          f"(its columns: {', '.join(fields)}); build with --keep-fields {field}")
    return numbers(read_column(sidecar, field), f"--from-field {field!r}"), {"from": "field", "field": field}


def from_file(path: str, num_samples: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A `.npy` file's numbers (one per sample id) as scores, and its name and SHA-256."""
    from croupier.shards.build.embeddings_in import file_sha256

    p = Path(path)
    if p.suffix.lower() != ".npy":
        raise ConfigError(f"--from-file takes a .npy array of one number per sample, got {path!r}")
    if not p.is_file():
        raise ConfigError(f"--from-file {path}: no such file")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"--from-file {path} is not a readable .npy array: {exc}") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iuf":
        raise DatasetError(f"--from-file {path} must be a 1-D numeric array, got {arr.dtype} {arr.shape}")
    if len(arr) != num_samples:
        raise DatasetError(f"--from-file {path} holds {len(arr)} scores but the dataset holds {num_samples} samples: "
                           "one number per sample id")
    values = numbers(arr.tolist(), f"--from-file {path}")
    return values, {"from": "file", "file": p.name, "path": str(p.resolve()), "sha256": file_sha256(p)}


def from_parquet(sidecar: Any, path: str, column: str | None, key: str | None) -> tuple[np.ndarray, dict[str, Any]]:
    """A Parquet column as scores: row i for sample id i, or, with `key`, joined on a kept field
    (every sample's key must appear in the file once)."""
    from croupier.optional import require
    from croupier.shards.build.embeddings_in import file_sha256

    pq = require("pyarrow.parquet", "reading --from-file FILE.parquet")

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--from-file {path}: no such file")
    if column is None:
        raise ConfigError(f"--from-file {path} is a Parquet file: name its score column with --column COL")
    try:
        table = pq.read_table(p, columns=[column, *([key] if key else [])])
    except Exception as exc:
        raise DatasetError(f"--from-file {path}: cannot read column {column!r}"
                           f"{f' and key {key!r}' if key else ''}: {exc}") from None
    what = f"--from-file {path} (column {column!r})"
    values = numbers(table.column(column).to_pylist(), what)
    n = sidecar.num_samples
    source = {"from": "file", "file": p.name, "path": str(p.resolve()), "sha256": file_sha256(p), "column": column,
              "key": key}
    if key is None:
        if len(values) != n:
            raise DatasetError(f"{what} holds {len(values)} scores but the dataset holds {n} samples: one row per "
                               "sample id (or join on a kept field with --key FIELD)")
        return values, source
    fields = kept_fields(sidecar)
    if key not in fields:
        raise ConfigError(f"--key {key!r} is not a kept field of {str(sidecar.root)!r} (its columns: "
                          f"{', '.join(fields)})")
    row_of: dict[Any, int] = {}
    for i, k in enumerate(table.column(key).to_pylist()):
        if k in row_of:
            raise DatasetError(f"{what}: key {key} {k!r} appears twice (rows {row_of[k]} and {i})")
        row_of[k] = i
    out = np.empty(n, dtype=np.float32)
    for i, k in enumerate(read_column(sidecar, key)):
        row = row_of.get(k)
        if row is None:
            raise DatasetError(f"{what}: sample {i} has {key} {k!r}, which the file does not hold")
        out[i] = values[row]
    return out, source


def store_external(dataset: str, *, field: str | None = None, file: str | None = None, name: str | None = None,
                   lower_is_better: bool = False, column: str | None = None,
                   key: str | None = None) -> tuple[str, np.ndarray, dict[str, Any]]:
    """Read the field or file, store it as score `name` (default: the field, or the file's stem); returns
    (name, values, the record written to the manifest)."""
    from croupier.format.sidecar import Sidecar, validate_name

    if (field is None) == (file is None):
        raise ConfigError("give one of --from-field FIELD or --from-file FILE.npy")
    sidecar = Sidecar.open(dataset)
    parquet = file is not None and str(file).lower().endswith(".parquet")
    if (column is not None or key is not None) and not parquet:
        raise ConfigError("--column and --key apply to --from-file FILE.parquet")
    default = field if field is not None else (column if parquet and column else Path(str(file)).stem)
    name = validate_name("score", name or default)
    if field is not None:
        values, source = from_field(sidecar, field)
    elif parquet:
        values, source = from_parquet(sidecar, str(file), column, key)
    else:
        values, source = from_file(str(file), sidecar.num_samples)
    record = {"scorer": SCORER, **source, "higher_is_better": not lower_is_better}
    sidecar.write_scores(name, values, record)
    return name, values, record


__all__ = ["SCORER", "from_field", "from_file", "kept_fields", "numbers", "read_column", "store_external"]
