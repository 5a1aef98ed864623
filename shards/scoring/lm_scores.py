"""The shared scoring driver: chunked, resumable, bounded-memory, with progress and rates.

A scorer maps a chunk of sample ids [a, b) to float32 scores. `run_chunked` walks the
dataset chunk by chunk and keeps its progress in a work folder:

    WORK/job.json     what is being computed (scorer params, N, chunk size)
    WORK/scores.f32   float32 (N,) raw memory map, filled chunk by chunk
    WORK/done.u8      one byte per chunk, set after the chunk's scores are flushed

A run that stops (crash, Ctrl-C, endpoint outage) leaves the finished chunks on disk; the
next run with the same parameters continues from there. A run with other parameters
starts afresh. Memory is one chunk of inputs plus the two maps.

`ShardTextReader` reads one text column of a local MDS dataset sequentially, one shard at
a time, decompressing compressed shards into a private temporary folder (the dataset
folder is never written to).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError
from croupier.format.atomic import write_json_atomic

JOB_VERSION = 1


class ChunkedRun:
    """Resumable per-chunk score storage in a work folder (see module doc)."""

    def __init__(self, work_dir: str | os.PathLike[str], n: int, chunk_size: int,
                 params: dict[str, Any]) -> None:
        if n < 1:
            raise ConfigError(f"nothing to score: the dataset has {n} samples")
        if chunk_size < 1:
            raise ConfigError(f"chunk size must be >= 1, got {chunk_size}")
        self.dir = Path(work_dir)
        self._lock = _exclusive_lock(self.dir.with_name(self.dir.name + ".lock"))
        try:
            self._open(n, chunk_size, params)
        except BaseException:
            self.close()  # a run that cannot start releases the lock at once
            raise

    def _open(self, n: int, chunk_size: int, params: dict[str, Any]) -> None:
        self.n = int(n)
        self.chunk_size = int(chunk_size)
        self.num_chunks = -(-self.n // self.chunk_size)
        job = {"version": JOB_VERSION, "n": self.n, "chunk_size": self.chunk_size,
               "params": json.loads(json.dumps(params, sort_keys=True, default=str))}
        self.resumed = False
        job_path = self.dir / "job.json"
        if job_path.is_file():
            try:
                old = json.loads(job_path.read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old == job and (self.dir / "scores.f32").is_file() and (self.dir / "done.u8").is_file():
                self.resumed = True
            else:
                shutil.rmtree(self.dir)
        if not self.resumed:
            self.dir.mkdir(parents=True, exist_ok=True)
            np.zeros(self.n, dtype=np.float32).tofile(self.dir / "scores.f32")
            np.zeros(self.num_chunks, dtype=np.uint8).tofile(self.dir / "done.u8")
            write_json_atomic(job_path, job, indent=None)
        self._scores = np.memmap(self.dir / "scores.f32", dtype=np.float32, mode="r+", shape=(self.n,))
        self._done = np.memmap(self.dir / "done.u8", dtype=np.uint8, mode="r+", shape=(self.num_chunks,))

    def bounds(self, chunk: int) -> tuple[int, int]:
        a = chunk * self.chunk_size
        return a, min(self.n, a + self.chunk_size)

    def pending(self) -> np.ndarray:
        """Indices of the chunks not scored yet."""
        return np.flatnonzero(self._done == 0)

    def done_samples(self) -> int:
        done = np.flatnonzero(self._done != 0)
        return int(sum(b - a for a, b in map(self.bounds, done)))

    def write(self, chunk: int, values: np.ndarray) -> None:
        a, b = self.bounds(chunk)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (b - a,):
            raise ConfigError(f"chunk {chunk} needs {b - a} scores, the scorer returned {values.shape}")
        self._scores[a:b] = values
        self._scores.flush()
        self._done[chunk] = 1
        self._done.flush()

    def complete(self) -> bool:
        return bool((self._done != 0).all())

    def result(self) -> np.ndarray:
        if not self.complete():
            raise ConfigError(f"{len(self.pending())} of {self.num_chunks} chunks are not scored yet")
        return np.array(self._scores)

    def close(self) -> None:
        """Release the maps and the lock; the work folder stays for a later resume."""
        self._scores = self._done = None
        if self._lock is not None:
            self._lock.close()  # closing the descriptor releases the flock
            self._lock = None

    def __enter__(self) -> ChunkedRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _exclusive_lock(path: Path) -> Any:
    """An exclusive, non-blocking flock: two runs must not fill the same work folder."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError(f"another scoring run is filling {str(path.with_suffix(''))!r}; wait for it "
                          f"or stop it first") from None
    return f


class Progress:
    """A one-line progress report with rate and ETA on stderr (silent when disabled)."""

    def __init__(self, total: int, label: str, *, initial: int = 0, enabled: bool = True,
                 unit: str = "samples", every: float = 1.0) -> None:
        self.total, self.label, self.unit = int(total), label, unit
        self.done = int(initial)
        self.initial = int(initial)
        self.enabled = enabled
        self.every = every
        self.t0 = time.monotonic()
        self._last = 0.0

    def rate(self) -> float:
        dt = time.monotonic() - self.t0
        return (self.done - self.initial) / dt if dt > 0 else 0.0

    def update(self, k: int) -> None:
        self.done += int(k)
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.every or self.done >= self.total):
            self._last = now
            r = self.rate()
            eta = (self.total - self.done) / r if r > 0 else float("inf")
            eta_s = f"{eta:,.0f}s" if np.isfinite(eta) else "?"
            print(f"\r{self.label}: {self.done:,}/{self.total:,} {self.unit} "
                  f"({100.0 * self.done / self.total:5.1f}%) {r:,.0f} {self.unit}/s ETA {eta_s}  ",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def run_chunked(run: ChunkedRun, score_chunk: Callable[[int, int], np.ndarray], *,
                label: str, progress: bool = True) -> np.ndarray:
    """Score every pending chunk of `run` with score_chunk(a, b); return all N scores.

    Finished chunks are kept on disk as they complete, so an exception (endpoint down,
    interrupt) loses at most the chunk in flight; calling again resumes.
    """
    bar = Progress(run.n, label, initial=run.done_samples(), enabled=progress)
    try:
        for chunk in run.pending():
            a, b = run.bounds(int(chunk))
            run.write(int(chunk), score_chunk(a, b))
            bar.update(b - a)
    finally:
        bar.close()
    return run.result()


class ShardTextReader:
    """Sequential reader of one column of a local MDS dataset, shard by shard.

    `texts(a, b)` returns the column for global sample ids [a, b) as strings. Compressed
    shards are decompressed into a private temporary folder, one at a time.
    """

    def __init__(self, dataset_dir: str | os.PathLike[str], field: str = "text") -> None:
        from croupier.format.mds_index import MDSIndex
        from croupier.format.streaming_lib import reader_from_json

        self.root = Path(dataset_dir)
        self.index = MDSIndex.read(self.root)
        names = self.index.columns
        if field not in names:
            raise ConfigError(f"the dataset has no column {field!r}; columns: {', '.join(names)}")
        self.field = field
        self._reader_from_json = reader_from_json
        self.num_samples = self.index.num_samples
        self._tmp: str | None = None
        self._open_shard = -1
        self._reader: Any = None

    def _shard(self, s: int) -> Any:
        if s == self._open_shard:
            return self._reader
        self._release()
        entry = self.index.shards[s]
        info = entry.info
        raw = entry.raw.basename
        base = self.root
        if not (self.root / raw).is_file():
            zpath = self.root / entry.zip.basename if entry.zip is not None else None
            if zpath is None or not zpath.is_file():
                raise DatasetError(f"shard {raw!r} of {str(self.root)!r} is missing (neither raw "
                                   f"nor compressed file is present locally)")
            from croupier.format.streaming_lib import decompress
            if self._tmp is None:
                self._tmp = tempfile.mkdtemp(prefix="croupier-score-")
            data = decompress(entry.compression, zpath.read_bytes())
            (Path(self._tmp) / raw).parent.mkdir(parents=True, exist_ok=True)
            (Path(self._tmp) / raw).write_bytes(data)
            base = Path(self._tmp)
        self._reader = self._reader_from_json(str(base), None, info)
        self._open_shard = s
        return self._reader

    def _release(self) -> None:
        if self._tmp is not None and self._open_shard >= 0:
            for f in Path(self._tmp).rglob("*"):
                if f.is_file():
                    f.unlink()
        self._reader = None
        self._open_shard = -1

    def texts(self, a: int, b: int) -> list[str]:
        if not (0 <= a <= b <= self.num_samples):
            raise ConfigError(f"sample range [{a}, {b}) is outside [0, {self.num_samples})")
        out: list[str] = []
        table = self.index.table
        i = a
        while i < b:
            s = int(table.shard_of([i])[0])
            stop = min(b, int(table.ends[s]))
            reader = self._shard(s)
            base = int(table.starts[s])
            for j in range(i - base, stop - base):
                v = reader[j][self.field]
                out.append(v if isinstance(v, str) else
                           v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
            i = stop
        return out

    def close(self) -> None:
        self._release()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> ShardTextReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
