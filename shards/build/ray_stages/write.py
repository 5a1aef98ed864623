"""The write stage on Ray: runs of whole shard blocks written in parallel, merged into one index.

The local engine's shard-aligned blocks (`croupier.shards.build.stages.write.shard_blocks`)
are cut into runs of whole blocks (`write_runs`); each Ray task writes one run with its own
MDSWriter through the local `write_run`, every block starting a shard as locally, so each
task's shards are the local shards. The driver renames them into one sequence and merges
their index entries into the `index.json` MDSWriter itself would have written, byte for
byte (with --tokenizer, the runs' token counts too). `--layout original` is one task: its
shard boundaries depend on the whole sequence. Finished runs are recorded in the state, and
Ray reruns a task whose worker died (a task writes its run afresh).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from croupier.format.atomic import write_bytes_atomic, write_npy_atomic
from croupier.format.mds_index import INDEX_BASENAME
from croupier.shards.build import work_files
from croupier.shards.build.config import BuildConfig
from croupier.shards.build.context import BuildContext
from croupier.shards.build.ray_stages.session import TASK_RETRIES, RaySession
from croupier.shards.build.stages.write import mds_columns, shard_blocks, write_run
from croupier.shards.ray_cancel import cancel_tasks


def write_runs(blocks: Sequence[tuple[int, int]], tasks: int) -> list[tuple[int, int]]:
    """Cut the blocks (id ranges in write order) into at most `tasks` runs of whole blocks.

    Returns [first block, end block) per run, each run about the same number of documents.
    """
    if not blocks:
        return []
    sizes = np.array([b - a for a, b in blocks], dtype=np.int64)
    ends = np.cumsum(sizes)
    target = ends[-1] / max(1, tasks)
    runs: list[tuple[int, int]] = []
    lo = 0
    for i in range(len(blocks)):
        if ends[i] >= target * (len(runs) + 1) or i == len(blocks) - 1:
            runs.append((lo, i + 1))
            lo = i + 1
    return runs


def _write_run(cfg: BuildConfig, work: str, parts: list[dict[str, Any]], columns: dict[str, str],
               blocks: list[tuple[int, int]], folder: str, cluster_major: bool) -> dict[str, Any]:
    """Ray task: write whole blocks (ranges of the write order) as MDS shards into `folder`.

    With --tokenizer the run's token counts, in write order, go beside its shards.
    """
    from croupier.shards.build.textstore import TextStore

    store = TextStore(Path(work) / work_files.PARTS, parts, cfg.keep_fields)
    order = np.load(Path(work) / work_files.ORDER, mmap_mode="r") if cluster_major else None
    tokenizer = None
    if cfg.tokenizer is not None:
        from croupier.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    t0 = time.perf_counter()
    counts = write_run(cfg, store, order, blocks, columns, Path(folder), tokenizer)
    if counts is not None:
        write_npy_atomic(Path(folder) / work_files.TOKEN_COUNTS, counts)
    return {"folder": folder, "pid": os.getpid(), "seconds": time.perf_counter() - t0,
            "docs": int(sum(b - a for a, b in blocks))}


def _run_folder(mds: Path, r: int) -> Path:
    return mds / f"run{r:05d}"


class RayWrite:
    """The Ray engine's write stage (see the module docstring)."""

    name = "write"

    def __init__(self, session: RaySession) -> None:
        self.session = session

    def run(self, ctx: BuildContext) -> int:
        import ray

        cfg, st = ctx.cfg, ctx.state
        n = ctx.n
        columns = st["columns"] = mds_columns(ctx)
        blocks = shard_blocks(ctx)
        # the runs are kept, so a build resumed with other --ray-workers finishes the same runs
        cut = write_runs(blocks, 4 * self.session.workers) if cfg.cluster_major else [(0, len(blocks))]
        runs = [(int(a), int(b)) for a, b in st.setdefault("ray_write_runs", cut)]
        done: dict[str, Any] = st.setdefault("ray_write", {})
        mds = ctx.work / work_files.MDS
        task = ray.remote(max_retries=TASK_RETRIES)(_write_run)
        todo = [r for r in range(len(runs)) if str(r) not in done]
        bar = ctx.progress.bar("write", total=n, initial=sum(d["docs"] for d in done.values()))
        t0 = time.perf_counter()
        refs = {task.remote(cfg, str(ctx.work), st["parts"], columns, blocks[runs[r][0]:runs[r][1]],
                            str(_run_folder(mds, r)), cfg.cluster_major): r for r in todo}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                info = ray.get(ready[0])
                done[str(refs[ready[0]])] = {"pid": int(info["pid"]), "docs": int(info["docs"])}
                bar.update(int(info["docs"]))
                ctx.commit(self.name, refs[ready[0]])
        finally:
            cancel_tasks(pending)
            bar.close()
        _merge_runs(ctx, mds, len(runs), done, [blocks[a][0] for a, _ in runs])
        ctx.timed(self.name, t0, n)
        return len(runs)


def _merge_runs(ctx: BuildContext, mds: Path, runs: int, done: dict[str, Any], starts: list[int]) -> None:
    """Rename every run's shards into one sequence and write the index MDSWriter would have
    (with --tokenizer, the runs' token counts first, each at its run's first write position).

    Idempotent: a merge killed after writing the index is not redone.
    """
    if (mds / INDEX_BASENAME).exists():
        return
    if ctx.cfg.tokenizer is not None:
        counts = np.zeros(ctx.n, dtype=np.int32)
        for r in range(runs):
            part = np.load(_run_folder(mds, r) / work_files.TOKEN_COUNTS)
            counts[starts[r]:starts[r] + len(part)] = part
        write_npy_atomic(ctx.work / work_files.TOKEN_COUNTS, counts)
    shards: list[dict[str, Any]] = []
    writers: dict[str, int] = {}
    for r in range(runs):
        folder = _run_folder(mds, r)
        index = json.loads((folder / INDEX_BASENAME).read_text())
        for entry in index["shards"]:
            i = len(shards)
            for key in ("raw_data", "zip_data"):
                info = entry.get(key)
                if not info:
                    continue
                old = info["basename"]
                name = old.split(".")
                new = ".".join([name[0], f"{i:05}", *name[2:]])
                if (folder / old).exists():
                    os.replace(folder / old, mds / new)
                info["basename"] = new
            stored = (entry.get("zip_data") or entry["raw_data"])["basename"]
            writers[stored] = int(done[str(r)]["pid"])
            shards.append(entry)
    ctx.state["shard_writers"] = writers
    ctx.save()
    write_bytes_atomic(mds / INDEX_BASENAME, json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode())
    for r in range(runs):
        shutil.rmtree(_run_folder(mds, r), ignore_errors=True)
