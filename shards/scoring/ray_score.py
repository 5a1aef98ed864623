"""`croupier shards score --by density --engine ray`: the two sketch passes as Ray tasks.

The sketch is a table of integer counts, so it is a sum: each task counts a run of whole
chunks into its own sketch, and the driver adds the tables (exactly the local table, integer
addition being associative). Pass 2 queries the merged table chunk by chunk in tasks, on the
local engine's chunk grid, so every score equals the local one bit for bit. Progress is saved
as locally (the sketch after pass 1, every scored chunk in pass 2): a killed run resumes, on
either engine. Tasks read the memory-mapped embeddings from the sidecar folder, which every
Ray node must see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from croupier.optional import require
from croupier.shards.ray_cancel import cancel_tasks
from croupier.shards.scoring.density import DensityParams, DensitySketch, load_sketch, save_sketch

TASK_RETRIES = 3


def _count(path: str, params: DensityParams, spans: list[tuple[int, int]]) -> np.ndarray:
    emb = np.load(path, mmap_mode="r")
    sketch = DensitySketch(emb.shape[1], params)
    for a, b in spans:
        sketch.add(emb[a:b])
    return sketch.counts


def _query(path: str, params: DensityParams, counts: np.ndarray,
           chunks: list[tuple[int, int, int]]) -> list[tuple[int, np.ndarray]]:
    emb = np.load(path, mmap_mode="r")
    sketch = DensitySketch(emb.shape[1], params)
    sketch.counts[:] = counts
    return [(c, sketch.query(emb[a:b])) for c, a, b in chunks]


def _split(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def ray_density_passes(run: Any, emb_path: Path, dim: int, params: DensityParams, *, address: str | None = None,
                       progress: bool = True) -> np.ndarray:
    """Both passes on Ray for a `ChunkedRun`; returns the scores (float32, N)."""
    from croupier.shards.scoring.lm_scores import Progress

    ray = require("ray", "the Ray scoring engine")
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        started = True
    try:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        path = str(emb_path)
        sketch = DensitySketch(dim, params)
        sketch_file = run.dir / "sketch.npz"
        start = load_sketch(sketch_file, sketch) if run.resumed else 0
        if start < run.num_chunks:
            bar = Progress(run.n, "density pass 1/2 (sketch, ray)", initial=min(run.n, start * run.chunk_size),
                           enabled=progress, unit="embeddings")
            count = ray.remote(max_retries=TASK_RETRIES)(_count)
            groups = _split([run.bounds(c) for c in range(start, run.num_chunks)], 2 * workers)
            refs = {count.remote(path, params, g): g for g in groups}
            pending = list(refs)
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    np.add(sketch.counts, ray.get(ready[0]), out=sketch.counts, casting="unsafe")
                    span = sum(b - a for a, b in refs[ready[0]])
                    sketch.num_added += span
                    bar.update(span)
            finally:
                cancel_tasks(pending)
                bar.close()
            save_sketch(sketch_file, sketch, run.num_chunks)
        todo = [(int(c), *run.bounds(int(c))) for c in run.pending()]
        if todo:
            bar = Progress(run.n, "density pass 2/2 (query, ray)", initial=run.done_samples(), enabled=progress,
                           unit="embeddings")
            query = ray.remote(max_retries=TASK_RETRIES)(_query)
            counts = ray.put(sketch.counts)
            pending = [query.remote(path, params, counts, g) for g in _split(todo, 4 * workers)]
            try:
                while pending:
                    ready, pending = ray.wait(pending, num_returns=1)
                    for c, values in ray.get(ready[0]):
                        run.write(c, values)
                        a, b = run.bounds(c)
                        bar.update(b - a)
            finally:
                cancel_tasks(pending)
                bar.close()
        return run.result()
    finally:
        if started:
            ray.shutdown()
