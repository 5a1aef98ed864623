"""Embeddings kept across builds of the same corpus (`croupier shards build --embed-cache DIR`).

Embedding is the one stage of a build whose cost grows with the model (minutes per 10k
documents for MiniLM on a CPU); clustering and writing are cheap. A sweep over clustering
settings (K, `--group-by`, `--cluster-size`) of one corpus would embed the same texts again
for every build. With a cache folder, the first build stores its float16 embedding matrix
there and every later build whose texts and embedder match copies it instead of embedding.

The key is a SHA-256 over the embedder's description (what the sidecar manifest records:
model, dimension, seed...) and every text in input order (each prefixed by its byte length,
so the boundaries count). A different corpus, order or embedder misses. A file under the key
that cannot be read, or whose shape or dtype is not (N, dim) float16, is a fault: reported in
`CacheLookup.fault` (the build logs it and records it in the manifest), then the build embeds
as usual and replaces the file. Files are written to a temporary name and renamed, so a
crashed build never leaves a partial file under a key.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError

SUFFIX = ".f16.npy"


def cache_key(describe: dict[str, Any], text_chunks: Iterable[list[str]]) -> str:
    """SHA-256 (hex) of the embedder description and the length-prefixed texts, in order."""
    h = hashlib.sha256()
    h.update(json.dumps(describe, sort_keys=True).encode())
    count = 0
    for chunk in text_chunks:
        for text in chunk:
            raw = text.encode("utf-8", "surrogatepass")
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
            count += 1
    h.update(count.to_bytes(8, "little"))
    return h.hexdigest()


@dataclass(frozen=True)
class CacheLookup:
    """The outcome of a lookup: `hit` when the file was copied; `fault` names a bad file."""

    key: str
    hit: bool
    fault: str | None = None


class EmbeddingCache:
    """A folder of `<key>.f16.npy` embedding matrices (rows in input order)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"--embed-cache must be a folder; {str(self.folder)!r} exists and is not one")

    def path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def fetch(self, key: str, n: int, dim: int, dest: Path) -> CacheLookup:
        """Copy the matrix under `key` to `dest` when it is an (n, dim) float16 matrix."""
        src = self.path(key)
        if not src.exists():
            return CacheLookup(key, False)
        try:
            arr = np.load(src, mmap_mode="r")
            shape, dtype = tuple(arr.shape), arr.dtype
            del arr
        except (OSError, ValueError, EOFError) as exc:
            return CacheLookup(key, False, f"{src.name} is unreadable ({exc})")
        if shape != (n, dim) or dtype != np.float16:
            return CacheLookup(key, False, f"{src.name} holds a {dtype} matrix of shape {shape}, "
                                           f"expected float16 ({n}, {dim})")
        tmp = dest.with_name(dest.name + ".cache-tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return CacheLookup(key, True)

    def store(self, key: str, src: Path) -> Path:
        """Copy a finished embedding matrix in under `key` (temporary name, then rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        dest = self.path(key)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest
