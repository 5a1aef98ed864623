"""Density scores: a p-stable LSH count sketch of the embeddings (a RACE sketch).

The Density sampler of *How to Train Data-Efficient LLMs* (arXiv 2402.09668) needs the
kernel density of every embedding. Exact kernel sums cost O(N^2); a sketch of R rows x B
buckets gets an unbiased estimate in two linear passes and a few hundred MB at most:

- each row r owns a p-stable (Gaussian) L2 hash, `floor((a . x + b) / w)`, concatenated
  `hashes_per_row` times and mapped to one of B buckets;
- pass 1 adds every embedding to the bucket it hashes to in every row;
- pass 2 reads, for every embedding, the count of its bucket in every row; the score is
  the mean over rows.

The expected count for a query q is `sum_j p(||q - x_j|| / w)^K` (plus rare bucket
collisions), where p is the collision probability of the p-stable hash: a kernel density
whose bandwidth is w. Every embedding is counted in its own bucket, so scores are >= 1.

Everything here is a pure function of arrays (plus the sketch parameters and seed);
`DensitySketch.add` / `.query` take chunks so callers can stream a memory-mapped matrix
with bounded memory. Hashing is vectorized: one matrix product per chunk, no Python loop
over samples or rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from croupier.errors import ConfigError
from croupier.format.atomic import atomic_path

_SEED_TAG = 0x44454E53  # "DENS": keeps this stream apart from other uses of the same seed


@dataclass(frozen=True)
class DensityParams:
    """Parameters of the sketch; they go into the manifest next to the scores.

    rows: R, independent hash rows (the estimate's variance falls as 1/R).
    buckets: B, buckets per row.
    bandwidth: w, width of the p-stable hash cells, in embedding (L2) units.
    hashes_per_row: K, p-stable hashes concatenated per row (the kernel is p^K: larger K,
        sharper kernel).
    seed: seeds the projections, offsets and bucket mixing.
    """

    rows: int = 1000
    buckets: int = 20000
    bandwidth: float = 1.0
    hashes_per_row: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if int(self.rows) < 1:
            raise ConfigError(f"density rows must be >= 1, got {self.rows}")
        if int(self.buckets) < 2:
            raise ConfigError(f"density buckets must be >= 2, got {self.buckets}")
        if int(self.rows) * int(self.buckets) > 2**31 - 1:
            raise ConfigError(
                f"density sketch of {self.rows} x {self.buckets} cells exceeds 2^31 - 1 cells"
            )
        if not (float(self.bandwidth) > 0.0 and np.isfinite(self.bandwidth)):
            raise ConfigError(f"density bandwidth must be a positive number, got {self.bandwidth}")
        if int(self.hashes_per_row) < 1:
            raise ConfigError(f"density hashes_per_row must be >= 1, got {self.hashes_per_row}")
        if int(self.seed) < 0:
            raise ConfigError(f"density seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict:
        return {k: (float(v) if k == "bandwidth" else int(v)) for k, v in asdict(self).items()}


class DensitySketch:
    """R x B count sketch over p-stable LSH buckets of d-dimensional embeddings.

    Memory: R*B int32 counts (80 MB at the paper's R=1000, B=20000) plus the d x (R*K)
    float32 projections. The hash functions are a pure function of (params, dim).

    A chunk is projected onto all K*R directions in one matrix product; hashing, counting
    and gathering then go `ROW_BLOCK` rows at a time, so each block's buckets and counts
    (a few MB) stay in cache instead of scattering over the whole R*B table.
    """

    ROW_BLOCK = 64

    def __init__(self, dim: int, params: DensityParams | None = None) -> None:
        if int(dim) < 1:
            raise ConfigError(f"embedding dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.params = params or DensityParams()
        p = self.params
        rows, k = int(p.rows), int(p.hashes_per_row)
        rng = np.random.default_rng(np.random.SeedSequence([_SEED_TAG, int(p.seed), self.dim]))
        # proj[j, r] is the j-th Gaussian direction of row r, pre-divided by the width w.
        self._proj = rng.standard_normal((k, rows, self.dim), dtype=np.float32) / np.float32(p.bandwidth)
        self._offset = rng.random((k, rows, 1), dtype=np.float32)  # b / w, uniform in [0, 1)
        self._mult = (rng.integers(0, 2**31, size=(k, rows, 1), dtype=np.uint32) * np.uint32(2)
                      + np.uint32(1))  # odd multipliers
        self.counts = np.zeros(rows * int(p.buckets), dtype=np.int32)
        self.num_added = 0

    # -- hashing -----------------------------------------------------------------------
    def _check(self, x: np.ndarray) -> np.ndarray:
        """Embeddings as a contiguous float32 (d, n) matrix."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ConfigError(f"embeddings must have shape (n, {self.dim}), got {x.shape}")
        return np.ascontiguousarray(x.T, dtype=np.float32)

    def _blocks(self) -> Iterator[tuple[int, int]]:
        rows = int(self.params.rows)
        for r0 in range(0, rows, self.ROW_BLOCK):
            yield r0, min(rows, r0 + self.ROW_BLOCK)

    def _project(self, xt: np.ndarray) -> np.ndarray:
        """All K*R projections of a chunk in one matrix product: (K, R, n) float32."""
        k, rows = self._proj.shape[:2]
        return (self._proj.reshape(k * rows, self.dim) @ xt).reshape(k, rows, xt.shape[1])

    def _block_buckets(self, proj: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """Bucket in [0, B) of rows [r0, r1) for each embedding: (r1 - r0, n) int64.

        Consumes `proj[:, r0:r1]` (floored in place).
        """
        p = self.params
        key = None
        for j in range(int(p.hashes_per_row)):  # K is small; rows and samples stay vectorized
            blk = proj[j, r0:r1]
            blk += self._offset[j, r0:r1]
            np.floor(blk, out=blk)
            # p-stable cell indices are small integers: 32-bit arithmetic holds them.
            codes = blk.astype(np.int32).view(np.uint32)
            codes *= self._mult[j, r0:r1]
            key = codes if key is None else np.add(key, codes, out=key)
        # Vector hash: sum_j code_j * odd_j (mod 2^32), an xorshift-multiply finalizer,
        # then a multiply-high onto [0, B) (no division).
        key ^= key >> np.uint32(15)
        key *= np.uint32(0x2C1B3C6D)
        key ^= key >> np.uint32(12)
        out = key.astype(np.int64)
        out *= int(p.buckets)
        out >>= 32
        return out

    def cells(self, x: np.ndarray) -> np.ndarray:
        """Flat sketch cell (row * B + bucket) of every row for each embedding: (n, R) int64."""
        proj = self._project(self._check(x))
        b = int(self.params.buckets)
        parts = [self._block_buckets(proj, r0, r1) + (np.arange(r0, r1, dtype=np.int64) * b)[:, None]
                 for r0, r1 in self._blocks()]
        return np.concatenate(parts, axis=0).T

    # -- the two passes ------------------------------------------------------------------
    def add(self, x: np.ndarray) -> None:
        """Pass 1: count a chunk of embeddings into the sketch."""
        xt = self._check(x)
        if xt.shape[1]:
            b = int(self.params.buckets)
            proj = self._project(xt)
            for r0, r1 in self._blocks():
                local = self._block_buckets(proj, r0, r1)
                local += (np.arange(r1 - r0, dtype=np.int64) * b)[:, None]
                seg = self.counts[r0 * b:r1 * b]
                np.add(seg, np.bincount(local.ravel(), minlength=len(seg)), out=seg, casting="unsafe")
        self.num_added += xt.shape[1]

    def query(self, x: np.ndarray) -> np.ndarray:
        """Pass 2: mean bucket count over rows for each embedding of a chunk (float32)."""
        xt = self._check(x)
        b = int(self.params.buckets)
        total = np.zeros(xt.shape[1], dtype=np.int64)
        proj = self._project(xt)
        for r0, r1 in self._blocks():
            local = self._block_buckets(proj, r0, r1)
            local += (np.arange(r1 - r0, dtype=np.int64) * b)[:, None]
            total += self.counts[r0 * b:r1 * b][local].sum(axis=0, dtype=np.int64)
        return (total / float(self.params.rows)).astype(np.float32)


def save_sketch(path: Path, sketch: DensitySketch, next_chunk: int) -> None:
    """Writes a pass-1 sketch and the first chunk not yet added to it, atomically.

    The one store for a resumable density run, local or on Ray: a crash leaves the previous
    sketch whole, and `load_sketch` carries on from its `next_chunk`."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, counts=sketch.counts, next_chunk=np.int64(next_chunk),
                     num_added=np.int64(sketch.num_added))


def load_sketch(path: Path, sketch: DensitySketch) -> int:
    """Loads a saved sketch into `sketch` (same dimension and parameters); returns its next chunk.

    0 when there is no saved sketch."""
    if not path.is_file():
        return 0
    with np.load(path) as z:
        sketch.counts[:] = z["counts"]
        sketch.num_added = int(z["num_added"])
        return int(z["next_chunk"])


def iter_chunks(n: int, chunk_size: int) -> Iterator[tuple[int, int]]:
    """(start, stop) pairs covering [0, n) in chunks of chunk_size."""
    if chunk_size < 1:
        raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield start, min(n, start + chunk_size)


def density_scores(embeddings: np.ndarray, params: DensityParams | None = None,
                   chunk_size: int = 8192) -> np.ndarray:
    """Sketch density of every row of `embeddings` (any float dtype, memmap welcome).

    Two streaming passes over the matrix, `chunk_size` rows at a time; returns float32 (N,).
    """
    emb = np.asarray(embeddings) if not isinstance(embeddings, np.memmap) else embeddings
    if emb.ndim != 2 or len(emb) == 0:
        raise ConfigError(f"density needs a non-empty (N, d) embedding matrix, got shape {emb.shape}")
    sketch = DensitySketch(emb.shape[1], params)
    for a, b in iter_chunks(len(emb), chunk_size):
        sketch.add(emb[a:b])
    out = np.empty(len(emb), dtype=np.float32)
    for a, b in iter_chunks(len(emb), chunk_size):
        out[a:b] = sketch.query(emb[a:b])
    return out


def suggest_bandwidth(embeddings: np.ndarray, sample: int = 2048, seed: int = 0,
                      neighbours: int = 10) -> float:
    """A data-driven bandwidth: median distance to the `neighbours`-th nearest neighbour
    within a random sample of `sample` rows, rescaled to the full data size.

    With d-dimensional data the k-NN radius shrinks as (n_sample / N)^(1/d); for the
    embedding sizes used in practice (d in the hundreds) that factor is close to 1, so the
    sample's k-NN distance is a fair scale for "near" in the full set.
    """
    emb = embeddings
    n = len(emb)
    if n < 2:
        raise ConfigError(f"need at least 2 embeddings to suggest a bandwidth, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([_SEED_TAG, int(seed), 1]))
    m = min(int(sample), n)
    idx = np.sort(rng.choice(n, size=m, replace=False))
    x = np.asarray(emb[idx], dtype=np.float32)
    sq = (x * x).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(d2, np.inf)
    k = min(int(neighbours), m - 1)
    kth = np.sqrt(np.partition(d2, k - 1, axis=1)[:, k - 1])
    scale = (m / n) ** (1.0 / x.shape[1])
    bw = float(np.median(kth) * scale)
    return bw if bw > 0 else 1.0
