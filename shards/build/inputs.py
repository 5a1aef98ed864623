"""Input documents for `croupier shards build`: JSON lines, Parquet and folders of .txt files.

`InputReader(paths, text_field, keep_fields, skip_bad)` streams records in a fixed order
(inputs in the order given, folders walked in sorted order; `files=` reads some of the
files `expand_inputs` listed, with their base folders, as the Ray engine's ingest does). Every record, good or bad,
gets a position; a resumed build passes `start=` to skip what it already ingested without
parsing it. A malformed line or a missing text field is a `DatasetError` naming the file
and line, or, with `skip_bad`, is counted in `stats` and skipped.

Formats: `.jsonl`, `.json`, `.ndjson` (one JSON object per line), each optionally `.gz` or
`.zst`; `.parquet`; `.txt` (one document per file; its relative path is the field `path`).
Token corpora (a Megatron `.idx`/`.bin`, an OLMo-style `.npy`) are listed here when named
explicitly, and read by `croupier.shards.build.token_corpus`, never by `InputReader`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from croupier.errors import DatasetError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".zst")


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
            break
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt") and path.name.lower().endswith(".txt"):
        return "txt"
    return None


def expand_inputs(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[Path, str, Path]]:
    """(file, kind, base folder) of every input file, in a fixed order."""
    if not paths:
        raise DatasetError("no input given: pass JSONL/Parquet files or folders, or --adopt an MDS dataset")
    files: list[tuple[Path, str, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and input_kind(f))
            if not found:
                raise DatasetError(f"input folder {str(p)!r} holds no .txt, .jsonl(.gz/.zst) or .parquet files")
            files.extend((f, input_kind(f), p) for f in found)  # type: ignore[misc]
        elif p.is_file():
            from croupier.shards.build.token_corpus import token_kind

            kind = input_kind(p) or token_kind(p)
            if kind is None:
                raise DatasetError(f"input {str(p)!r} has an unsupported format; "
                                   "use .jsonl/.json/.ndjson (optionally .gz/.zst), .parquet or .txt, "
                                   "or a token corpus (a Megatron .idx/.bin, an OLMo-style .npy)")
            files.append((p, kind, p.parent))
        else:
            raise DatasetError(f"input {str(p)!r} does not exist")
    return files


def input_signature(paths: Sequence[str | os.PathLike[str]]) -> list[list[Any]]:
    """Path, size and mtime of every input file: a resumed build refuses changed inputs."""
    files = [f for f, _, _ in expand_inputs(paths)]
    files += [f.with_suffix(s) for f, kind, _ in expand_inputs(paths) if kind == "megatron" for s in (".idx", ".bin")
              if f.with_suffix(s) != f and f.with_suffix(s).is_file()]  # a Megatron pair: both halves
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


@dataclass
class InputStats:
    """What a reader skipped (only with skip_bad)."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, where: str, why: str) -> None:
        self.skipped += 1
        if len(self.examples) < 5:
            self.examples.append(f"{where}: {why}")


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    if name.endswith(".zst"):
        from croupier.optional import require

        zstandard = require("zstandard", f"reading {name}")
        raw = open(path, "rb")
        try:
            stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        except BaseException:
            raw.close()
            raise
        return io.TextIOWrapper(stream, encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


class InputReader:
    """Stream (position, text, kept fields) from the inputs; see the module docstring."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], text_field: str = "text",
                 keep_fields: Sequence[str] = (), skip_bad: bool = False, *,
                 files: Sequence[tuple[Path, str, Path]] | None = None) -> None:
        self.files = expand_inputs(paths) if files is None else list(files)  # (file, kind, base folder)
        self.text_field = text_field
        self.keep_fields = tuple(keep_fields)
        self.skip_bad = skip_bad
        self.stats = InputStats()
        if text_field in self.keep_fields:
            raise DatasetError(f"--keep-fields must not repeat the text field {text_field!r}")

    def _bad(self, where: str, why: str) -> None:
        if not self.skip_bad:
            raise DatasetError(f"{where}: {why} (pass --skip-bad to skip such records)")
        self.stats.add(where, why)

    def _from_obj(self, obj: Any, where: str) -> tuple[str, dict[str, Any]] | None:
        if not isinstance(obj, dict):
            self._bad(where, f"expected a JSON object, got {type(obj).__name__}")
            return None
        text = obj.get(self.text_field)
        if text is None:
            fields = ", ".join(sorted(map(str, obj))[:10]) or "none"
            self._bad(where, f"missing text field {self.text_field!r} (fields: {fields})")
            return None
        if not isinstance(text, str):
            self._bad(where, f"text field {self.text_field!r} is a {type(text).__name__}, not a string")
            return None
        kept = {}
        for f in self.keep_fields:
            if f not in obj:
                self._bad(where, f"missing kept field {f!r}")
                return None
            kept[f] = obj[f]
        return text, kept

    def records(self, start: int = 0) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Yield (position, text, kept fields) of good records at positions >= start."""
        pos = 0
        for path, kind, base in self.files:
            if kind == "jsonl":
                it = self._jsonl(path, pos, start)
            elif kind == "parquet":
                it = self._parquet(path, pos, start)
            else:
                it = self._txt(path, base, pos, start)
            for p, rec in it:
                if rec is not None:
                    yield p, rec[0], rec[1]
            pos = self._end

    @property
    def end(self) -> int:
        """The position after the last record `records()` has read, good or bad."""
        return self._end

    # each per-format generator yields (position, record or None) and leaves self._end
    _end = 0

    def _jsonl(self, path: Path, pos0: int, start: int) -> Iterator[tuple[int, Any]]:
        pos = pos0
        try:
            with _open_text(path) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if pos >= start:
                        where = f"{path}:{lineno}"
                        try:
                            obj = json.loads(line)
                        except json.JSONDecodeError as exc:
                            hint = ("; the file looks like one JSON array, convert it to JSON lines"
                                    if lineno == 1 and line.lstrip().startswith("[") else "")
                            self._bad(where, f"malformed JSON ({exc.msg} at column {exc.colno}){hint}")
                            yield pos, None
                        else:
                            yield pos, self._from_obj(obj, where)
                    pos += 1
        except Exception as exc:  # I/O, decoding, gzip and zstd stream errors
            if isinstance(exc, DatasetError):
                raise
            raise DatasetError(f"input {str(path)!r} cannot be read: {exc}") from exc
        self._end = pos

    def _parquet(self, path: Path, pos0: int, start: int) -> Iterator[tuple[int, Any]]:
        import pyarrow.parquet as pq

        pos = pos0
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:
            raise DatasetError(f"input {str(path)!r} is not a readable Parquet file: {exc}") from exc
        names = pf.schema_arrow.names
        for col in (self.text_field, *self.keep_fields):
            if col not in names:
                raise DatasetError(f"{path}: Parquet file has no column {col!r} (columns: {', '.join(names)})")
        cols = [self.text_field, *self.keep_fields]
        row = 0
        for batch in pf.iter_batches(batch_size=8192, columns=cols):
            n = batch.num_rows
            if pos + n <= start:
                pos += n
                row += n
                continue
            data = batch.to_pydict()
            for j in range(n):
                if pos >= start:
                    yield pos, self._from_obj({c: data[c][j] for c in cols}, f"{path}: row {row}")
                pos += 1
                row += 1
        self._end = pos

    def _txt(self, path: Path, base: Path, pos0: int, start: int) -> Iterator[tuple[int, Any]]:
        if pos0 >= start:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:
                self._bad(str(path), f"not UTF-8 text ({exc.reason})")
                yield pos0, None
            except OSError as exc:
                raise DatasetError(f"input {str(path)!r} cannot be read: {exc}") from exc
            else:
                obj = {self.text_field: text, "path": str(path.relative_to(base))}
                yield pos0, self._from_obj(obj, str(path))
        self._end = pos0 + 1
