"""The assign stage on Ray: one task per assignment chunk, the local per-chunk search.

Each task reads its chunk of the memory-mapped embeddings, searches the trained centroids
(shipped once through the object store) and writes its rows of `assign.npy` in place; every
finished chunk is recorded in the state, and Ray reruns a task whose worker died.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from croupier.shards.build import work_files
from croupier.shards.build.context import BuildContext
from croupier.shards.build.ray_stages.session import TASK_RETRIES, RaySession
from croupier.shards.build.stages.embed import chunk_docs
from croupier.shards.ray_cancel import cancel_tasks


def assign_chunk(work: str, centroids: np.ndarray, i: int, chunk: int) -> int:
    """Ray task: the nearest centroid of every document of chunk `i`, into `assign.npy`."""
    from croupier.shards.build.cluster import Assigner

    emb = np.load(Path(work) / work_files.EMBEDDINGS, mmap_mode="r")
    out = np.load(Path(work) / work_files.ASSIGN, mmap_mode="r+")
    lo, hi = i * chunk, min(len(emb), (i + 1) * chunk)
    labels, _ = Assigner(centroids).assign(emb[lo:hi])
    out[lo:hi] = labels
    out.flush()
    return i


class RayAssign:
    """The Ray engine's assign stage (see the module docstring)."""

    name = "assign"

    def __init__(self, session: RaySession) -> None:
        self.session = session

    def run(self, ctx: BuildContext) -> None:
        import ray

        st = ctx.state
        n, c = ctx.n, ctx.cfg.assign_chunk
        path = ctx.work / work_files.ASSIGN
        done: list[int] = st.setdefault("ray_assign_chunks", [])
        if not done or not path.exists():
            done.clear()
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(n,))
            del arr
        todo = sorted(set(range((n + c - 1) // c)) - set(done))
        centroids = ray.put(np.load(ctx.work / work_files.CENTROIDS_RAW))
        task = ray.remote(max_retries=TASK_RETRIES)(assign_chunk)
        bar = ctx.progress.bar("assign", total=n, initial=sum(chunk_docs(i, c, n) for i in done))
        t0 = time.perf_counter()
        pending = [task.remote(str(ctx.work), centroids, i, c) for i in todo]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                i = int(ray.get(ready[0]))
                done.append(i)
                bar.update(chunk_docs(i, c, n))
                ctx.commit(self.name, i)
        finally:
            cancel_tasks(pending)
            bar.close()
        ctx.timed(self.name, t0, n)
        return None
