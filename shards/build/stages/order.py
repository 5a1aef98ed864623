"""The order stage: drop the clusters that came out empty and sort the documents by cluster.

A counting sort, chunk by chunk over the memory-mapped assignments, into `order.npy` (input
positions in cluster order, stable inside a cluster); beside it `remap.npy` (raw cluster ->
final cluster, -1 for an empty one), `offsets.npy` and the final centroids. Both engines run
it on the driver.
"""

from __future__ import annotations

import numpy as np

from croupier.format.atomic import write_npy_atomic
from croupier.shards.build import work_files
from croupier.shards.build.context import BuildContext


class OrderByCluster:
    """Counting sort of the documents by their (non-empty) cluster."""

    name = "order"

    def run(self, ctx: BuildContext) -> int:
        work = ctx.work
        assign = np.load(work / work_files.ASSIGN, mmap_mode="r")
        raw = np.load(work / work_files.CENTROIDS_RAW)
        n, k, c = len(assign), len(raw), ctx.cfg.assign_chunk
        counts = np.zeros(k, dtype=np.int64)
        for lo in range(0, n, c):
            counts += np.bincount(assign[lo:lo + c], minlength=k)
        keep = counts > 0
        remap = np.full(k, -1, dtype=np.int64)
        remap[keep] = np.arange(int(keep.sum()))
        sizes = counts[keep]
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        order = np.lib.format.open_memmap(work / work_files.ORDER, mode="w+", dtype=np.int64, shape=(n,))
        cursor = offsets[:-1].copy()
        k2 = len(sizes)
        for lo in range(0, n, c):
            lab = remap[np.asarray(assign[lo:lo + c])]
            o = np.argsort(lab, kind="stable")
            sl = lab[o]
            rank = np.arange(len(sl)) - np.searchsorted(sl, sl, side="left")
            order[cursor[sl] + rank] = lo + o
            cursor += np.bincount(lab, minlength=k2)
        order.flush()
        del order
        write_npy_atomic(work / work_files.REMAP, remap)
        write_npy_atomic(work / work_files.OFFSETS, offsets)
        write_npy_atomic(work / work_files.CENTROIDS, raw[keep])
        if k2 < k:
            ctx.progress.log(f"{k - k2} of {k} clusters came out empty and were dropped")
        ctx.state["k_final"] = k2
        return 0
