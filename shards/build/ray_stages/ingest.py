"""The ingest stage on Ray: groups of input files parsed in parallel into their own text parts.

Ray Data maps over contiguous groups of the input files; each group is parsed by the local
`InputReader`, one file at a time with the base folder `expand_inputs` gave it (so records
and messages, a bad record's file and line among them, match the local ones), into its own
parts (`gNNNNN/...`). Ids are the groups' documents in input order: the local ids. Finished
groups are recorded in the state one by one, so a resumed ingest redoes only the others.
A bad record comes back as data (`croupier.shards.ray_errors`) and is raised on the driver.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import CroupierError
from croupier.shards.build import work_files
from croupier.shards.build.config import BuildConfig
from croupier.shards.build.context import BuildContext
from croupier.shards.build.ray_stages.session import RaySession
from croupier.shards.build.stages.ingest import MAX_BAD_EXAMPLES, finish_ingest
from croupier.shards.ray_errors import error_row, raise_error_row

InputFile = tuple[Path, str, Path]
"""(file, kind, base folder), as `croupier.shards.build.inputs.expand_inputs` lists them."""


def file_groups(nfiles: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of input files, at most `groups` of them."""
    g = max(1, min(nfiles, groups))
    bounds = np.linspace(0, nfiles, g + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


class IngestGroup:
    """Ray Data map: parse one group of input files into its own text parts."""

    def __init__(self, cfg: BuildConfig, files: list[InputFile], ranges: list[tuple[int, int]], folder: str) -> None:
        self.cfg, self.files, self.ranges, self.folder = cfg, files, ranges, folder

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        g = int(row["group"])
        try:
            return self.ingest(g)
        except CroupierError as exc:  # Ray Data keeps only a traceback's text: carry the error as data
            return {"group": g, "parts": "[]", "skipped": 0, "examples": "[]", "seconds": 0.0, "pid": os.getpid(),
                    "error": error_row(exc)}

    def ingest(self, g: int) -> dict[str, Any]:
        from croupier.shards.build.inputs import InputReader
        from croupier.shards.build.textstore import PartWriter

        lo, hi = self.ranges[g]
        cfg = self.cfg
        folder = Path(self.folder) / f"g{g:05d}"
        shutil.rmtree(folder, ignore_errors=True)
        parts: list[dict[str, Any]] = []
        skipped = 0
        examples: list[str] = []
        pw = None
        t0 = time.perf_counter()
        try:
            for spec in self.files[lo:hi]:
                reader = InputReader((), cfg.text_field, cfg.keep_fields, cfg.skip_bad, files=[spec])
                for _pos, text, kept in reader.records():
                    if pw is None:
                        pw = PartWriter(folder, len(parts), cfg.keep_fields)
                    pw.add(text, kept)
                    if pw.n >= cfg.part_docs:
                        parts.append(pw.close())
                        pw = None
                skipped += reader.stats.skipped
                examples.extend(reader.stats.examples)
            if pw is not None:
                parts.append(pw.close())
                pw = None
        finally:
            if pw is not None:
                pw.abort()
        for p in parts:
            p["name"] = f"g{g:05d}/{p['name']}"
        return {"group": g, "parts": json.dumps(parts), "skipped": skipped,
                "examples": json.dumps(examples[:MAX_BAD_EXAMPLES]), "seconds": time.perf_counter() - t0,
                "pid": os.getpid(), "error": ""}


class RayIngest:
    """The Ray engine's ingest stage (see the module docstring)."""

    name = "ingest"

    def __init__(self, session: RaySession) -> None:
        self.session = session

    def run(self, ctx: BuildContext) -> int:
        import ray

        from croupier.shards.build.inputs import expand_inputs

        st = ctx.state
        files = expand_inputs(ctx.cfg.inputs)
        # the groups are kept, so a build resumed with other --ray-workers joins the same groups
        ranges = [(int(a), int(b)) for a, b in
                  st.setdefault("ray_file_groups", file_groups(len(files), 4 * self.session.workers))]
        done: dict[str, Any] = st.setdefault("ray_ingest", {})
        todo = [g for g in range(len(ranges)) if str(g) not in done]
        folder = ctx.work / work_files.PARTS
        t0 = time.perf_counter()
        bar = ctx.progress.bar("ingest", total=0,
                               initial=sum(sum(p["docs"] for p in d["parts"]) for d in done.values()))
        try:
            if todo:
                ds = ray.data.from_items([{"group": g} for g in todo], override_num_blocks=len(todo)).map(
                    IngestGroup(ctx.cfg, files, ranges, str(folder)),
                    compute=ray.data.TaskPoolStrategy(size=max(1, min(self.session.workers, len(todo)))))
                for row in ds.iter_rows():
                    raise_error_row(row["error"])
                    parts = json.loads(row["parts"])
                    done[str(int(row["group"]))] = {"parts": parts, "skipped": int(row["skipped"]),
                                                    "examples": json.loads(row["examples"])}
                    bar.update(sum(p["docs"] for p in parts))
                    ctx.commit(self.name, int(row["group"]))
        finally:
            bar.close()
        groups = [done[str(g)] for g in range(len(ranges))]
        st["parts"] = [p for d in groups for p in d["parts"]]
        st["skipped"] = sum(d["skipped"] for d in groups)
        st["bad_examples"] = [e for d in groups for e in d["examples"]][:MAX_BAD_EXAMPLES]
        n = finish_ingest(ctx)
        ctx.timed(self.name, t0, n)
        return len(ranges)
