"""The arrays stage: the sidecar's per-sample arrays, indexed by the dataset's sample ids.

Cluster-major shards renumber the documents: cluster c is the id range [offsets[c],
offsets[c+1]), so the assignments are ranges and the embeddings are gathered into the new id
order. In input order (`--layout original`, `--adopt`) ids are input positions: the
assignments are the raw ones remapped past the dropped empty clusters, and the members of
every cluster are the cluster order itself (moved into the sidecar at the end).
"""

from __future__ import annotations

import numpy as np

from croupier.format import sidecar_layout as names
from croupier.format.atomic import replace_durably
from croupier.shards.build import work_files
from croupier.shards.build.context import BuildContext

ARRAYS = names.ARRAY_FILES


class SidecarArrays:
    """Assignments (and, cluster-major, embeddings) in sample-id order, into the sidecar folder."""

    name = "arrays"

    def run(self, ctx: BuildContext) -> int:
        if ctx.cfg.cluster_major:
            self._cluster_major(ctx)
        else:
            self._original(ctx)
        return 0

    @staticmethod
    def _cluster_major(ctx: BuildContext) -> None:
        """Assignments are ranges; embeddings are gathered into the new id order."""
        side, work = ctx.paths.side, ctx.work
        order = np.load(work / work_files.ORDER, mmap_mode="r")
        offsets = np.load(work / work_files.OFFSETS)
        n = len(order)
        tmp = side / f".{ARRAYS[names.ASSIGNMENTS]}.tmp"
        a = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n,))
        for k in range(len(offsets) - 1):
            a[offsets[k]:offsets[k + 1]] = k
        a.flush()
        del a
        replace_durably(tmp, side / ARRAYS[names.ASSIGNMENTS])
        emb = np.load(work / work_files.EMBEDDINGS, mmap_mode="r")
        tmp = side / f".{ARRAYS[names.EMBEDDINGS]}.tmp"
        e = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=emb.shape)
        c = ctx.cfg.assign_chunk
        for lo in range(0, n, c):
            e[lo:lo + c] = emb[np.asarray(order[lo:lo + c])]
        e.flush()
        del e
        replace_durably(tmp, side / ARRAYS[names.EMBEDDINGS])

    @staticmethod
    def _original(ctx: BuildContext) -> None:
        """Input order: the raw assignments remapped past the dropped empty clusters."""
        side, work = ctx.paths.side, ctx.work
        assign = np.load(work / work_files.ASSIGN, mmap_mode="r")
        remap = np.load(work / work_files.REMAP)
        n, c = len(assign), ctx.cfg.assign_chunk
        tmp = side / f".{ARRAYS[names.ASSIGNMENTS]}.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.int32, shape=(n,))
        for lo in range(0, n, c):
            out[lo:lo + c] = remap[np.asarray(assign[lo:lo + c])]
        out.flush()
        del out
        replace_durably(tmp, side / ARRAYS[names.ASSIGNMENTS])
