"""The build's working copy of the input texts: append-only parts, memory-mapped for reading.

Ingest writes documents into parts (`NNNNN.text` holds the concatenated UTF-8 texts,
`NNNNN.text.off.npy` the int64 byte offsets; kept fields likewise as JSON). A part counts
only once the build state records it, so a killed ingest rewrites at most one part. Reading
maps every part, so random access in any order (the cluster-major rewrite) costs no RAM
beyond the page cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if v is None:
        return "null"
    return "other"


def mds_encoding(types: set[str]) -> str:
    """MDS column encoding for a kept field from the JSON types seen in it."""
    if types == {"str"}:
        return "str"
    if types == {"int"}:
        return "int64"
    if types and types <= {"int", "float"}:
        return "float64"
    return "json"


class PartWriter:
    """Writes one part; `close()` flushes and fsyncs and returns its description."""

    def __init__(self, folder: Path, index: int, keep_fields: Sequence[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.name = f"{index:05d}"
        self.folder = folder
        self.keep_fields = tuple(keep_fields)
        self._text = open(folder / f"{self.name}.text", "wb")
        self._text_off = [0]
        self._extra = open(folder / f"{self.name}.extra", "wb") if self.keep_fields else None
        self._extra_off = [0]
        self.types: dict[str, set[str]] = {f: set() for f in self.keep_fields}

    @property
    def n(self) -> int:
        return len(self._text_off) - 1

    def add(self, text: str, kept: dict[str, Any]) -> None:
        b = text.encode("utf-8", errors="surrogatepass")
        self._text.write(b)
        self._text_off.append(self._text_off[-1] + len(b))
        if self._extra is not None:
            e = json.dumps(kept, ensure_ascii=False).encode("utf-8")
            self._extra.write(e)
            self._extra_off.append(self._extra_off[-1] + len(e))
            for f, v in kept.items():
                self.types[f].add(_type_name(v))

    def close(self) -> dict[str, Any]:
        for f, offs, suffix in ((self._text, self._text_off, "text"), (self._extra, self._extra_off, "extra")):
            if f is None:
                continue
            f.flush()
            os.fsync(f.fileno())
            f.close()
            with open(self.folder / f"{self.name}.{suffix}.off.npy", "wb") as g:
                np.save(g, np.asarray(offs, dtype=np.int64))
                g.flush()
                os.fsync(g.fileno())
        return {"name": self.name, "docs": self.n, "types": {k: sorted(v) for k, v in self.types.items()}}

    def abort(self) -> None:
        for f in (self._text, self._extra):
            if f is not None and not f.closed:
                f.close()


class TextStore:
    """Read-only view over the committed parts, indexed by global document id."""

    def __init__(self, folder: Path, parts: Sequence[dict[str, Any]], keep_fields: Sequence[str] = ()) -> None:
        self.keep_fields = tuple(keep_fields)
        self._texts: list[np.ndarray] = []
        self._offs: list[np.ndarray] = []
        self._extras: list[np.ndarray] = []
        self._eoffs: list[np.ndarray] = []
        counts = []
        for p in parts:
            name = p["name"]
            offs = np.load(folder / f"{name}.text.off.npy", mmap_mode="r")
            self._offs.append(offs)
            self._texts.append(_map_bytes(folder / f"{name}.text"))
            if self.keep_fields:
                self._eoffs.append(np.load(folder / f"{name}.extra.off.npy", mmap_mode="r"))
                self._extras.append(_map_bytes(folder / f"{name}.extra"))
            counts.append(len(offs) - 1)
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        part = np.searchsorted(self.starts, ids, side="right") - 1
        return part, ids - self.starts[part]

    def texts(self, ids: np.ndarray) -> list[str]:
        ids = np.asarray(ids, dtype=np.int64)
        part, local = self._locate(ids)
        out = []
        for p, j in zip(part.tolist(), local.tolist()):
            offs = self._offs[p]
            out.append(self._texts[p][offs[j]:offs[j + 1]].tobytes().decode("utf-8", errors="surrogatepass"))
        return out

    def text_range(self, lo: int, hi: int) -> list[str]:
        return self.texts(np.arange(lo, hi, dtype=np.int64))

    def extras(self, ids: np.ndarray) -> list[dict[str, Any]]:
        if not self.keep_fields:
            return [{} for _ in range(len(ids))]
        ids = np.asarray(ids, dtype=np.int64)
        part, local = self._locate(ids)
        out = []
        for p, j in zip(part.tolist(), local.tolist()):
            offs = self._eoffs[p]
            out.append(json.loads(self._extras[p][offs[j]:offs[j + 1]].tobytes()))
        return out

    def nbytes(self, lo: int, hi: int) -> np.ndarray:
        """Approximate stored size of documents [lo, hi) (text plus kept fields)."""
        ids = np.arange(lo, hi, dtype=np.int64)
        part, local = self._locate(ids)
        out = np.zeros(len(ids), dtype=np.int64)
        for p in np.unique(part):
            m = part == p
            j = local[m]
            sizes = np.asarray(self._offs[p][j + 1]) - np.asarray(self._offs[p][j])
            if self.keep_fields:
                sizes = sizes + np.asarray(self._eoffs[p][j + 1]) - np.asarray(self._eoffs[p][j])
            out[m] = sizes
        return out


def _map_bytes(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")
