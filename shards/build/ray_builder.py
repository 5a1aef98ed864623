"""`croupier shards build --engine ray`: the build's stages on a Ray cluster, same dataset as local.

The local engine (`croupier.shards.build.builder.Builder`) runs every stage in one process. This
engine runs the heavy stages on Ray and keeps the driver's work O(chunk + K):

    ingest  Ray Data maps over groups of input files; each group is parsed by the local
            `InputReader` (so a bad record is named by file and line exactly as locally) into
            its own text parts. Ids are the groups' documents in input order: the local ids.
    embed   Ray Data maps chunk numbers over an actor pool (the model loads once per actor,
            one GPU per actor when the cluster has GPUs); each actor writes its chunk's rows
            of the float16 embedding matrix in place.
    train   faiss k-means on the driver, on the local engine's seeded uniform sample.
    assign  one Ray task per assignment chunk, the local per-chunk search.
    group   with --group-by, in place of train and assign: the local grouping stage on the
            driver (`croupier.shards.build.grouping.group_stage`: the field's codes from the ingested
            parts, then one cluster per group or k-means inside each group over the embedding
            matrix the actors wrote, one group's sample in memory at a time).
    order   the local counting sort (driver, chunked, memory-mapped).
    write   cluster-major: the local engine's shard-aligned blocks are cut into runs of whole
            blocks; each Ray task writes one run with its own MDSWriter (every block starts a
            shard, as locally, so each task's shards are the local shards). The driver renames
            them into one sequence and merges their index entries into the `index.json`
            MDSWriter itself would have written, byte for byte. Original layout: one Ray task
            (its shard boundaries depend on the whole sequence).
    final   the local sidecar writer.

Every stage is resumable: finished groups, chunks and write tasks are recorded in the build
state after each one, so a killed build resumes per stage and per task. Ray retries tasks
whose worker died; a bad record is a `DatasetError` naming the file and line. The work
folder must be visible to every Ray node (one machine, or a shared filesystem).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from croupier.errors import ConfigError, CroupierError, DatasetError
from croupier.format.atomic import write_bytes_atomic, write_npy_atomic
from croupier.format.mds_index import INDEX_BASENAME
from croupier.optional import require
from croupier.shards.build.ray_cancel import cancel_tasks
from croupier.shards.build.builder import TOKEN_COUNTS_WORK, BuildConfig, Builder, BuildResult, Hook

TASK_RETRIES = 3
"""How often Ray reruns an assign or write task whose worker process died (a bad record is not
retried; Ray Data applies its own retry and actor-restart defaults to ingest and embed)."""


@dataclass
class RayBuildResult(BuildResult):
    """A build result plus which process wrote each shard (basename -> pid)."""

    shard_writers: dict[str, int] = field(default_factory=dict)
    workers: int = 0


class _NoBar:
    def update(self, n: int) -> None:
        pass


def _unwrap(exc: BaseException) -> BaseException:
    """The croupier error a Ray (Data) failure carries, else the failure itself."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CroupierError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, CroupierError):
                return cause
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return exc


def _file_groups(nfiles: int, groups: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges of input files, at most `groups` of them."""
    g = max(1, min(nfiles, groups))
    bounds = np.linspace(0, nfiles, g + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


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


# -- work done inside Ray workers ----------------------------------------------------------------

class _IngestGroup:
    """Ray Data map: parse one group of input files into its own text parts."""

    def __init__(self, cfg: BuildConfig, files: list[str], ranges: list[tuple[int, int]], folder: str) -> None:
        self.cfg, self.files, self.ranges, self.folder = cfg, files, ranges, folder

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        g = int(row["group"])
        try:
            return self._ingest(g)
        except CroupierError as exc:  # Ray Data keeps only a traceback's text: carry the error as data
            return {"group": g, "parts": "[]", "skipped": 0, "examples": "[]", "seconds": 0.0, "pid": os.getpid(),
                    "error": _error_row(exc)}

    def _ingest(self, g: int) -> dict[str, Any]:
        from croupier.shards.build.inputs import InputReader
        from croupier.shards.build.textstore import PartWriter

        lo, hi = self.ranges[g]
        cfg = self.cfg
        # Each file is read on its own, with the base folder expand_inputs gave it (a .txt
        # document's `path` field is relative to it), so records and messages match local ones.
        reader_files = self.files[lo:hi]
        folder = Path(self.folder) / f"g{g:05d}"
        shutil.rmtree(folder, ignore_errors=True)
        parts: list[dict[str, Any]] = []
        skipped = 0
        examples: list[str] = []
        pw = None
        t0 = time.perf_counter()
        try:
            for spec in reader_files:
                path, base = spec.split("\0")
                reader = InputReader([path], cfg.text_field, cfg.keep_fields, cfg.skip_bad)
                reader.files = [(Path(path), reader.files[0][1], Path(base))]
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
        return {"group": g, "parts": json.dumps(parts), "skipped": skipped, "examples": json.dumps(examples[:5]),
                "seconds": time.perf_counter() - t0, "pid": os.getpid(), "error": ""}


def _error_row(exc: CroupierError) -> str:
    return json.dumps({"type": type(exc).__name__, "message": str(exc)})


def _raise_error_row(text: str) -> None:
    """Re-raise on the driver a croupier error that a Ray Data worker returned as data."""
    if not text:
        return
    import croupier.errors as errors

    err = json.loads(text)
    cls = getattr(errors, err["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, CroupierError)) or cls is errors.FingerprintMismatch:
        cls = DatasetError
    raise cls(err["message"])


class _EmbedActor:
    """Ray Data actor: loads the embedder once, embeds whole chunks into the shared memmap."""

    def __init__(self, cfg: BuildConfig, work: str, parts: list[dict[str, Any]], n: int) -> None:
        from croupier.shards.build.textstore import TextStore

        self.cfg, self.n = cfg, n
        self.emb = Builder(cfg)._make_embedder()
        self.store = TextStore(Path(work) / "parts", parts, cfg.keep_fields)
        self.path = Path(work) / "embeddings.npy"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        arr = np.load(self.path, mmap_mode="r+")
        c = self.cfg.chunk
        done, secs = [], []
        for i in np.asarray(batch["chunk"]).tolist():
            lo, hi = i * c, min(self.n, (i + 1) * c)
            t0 = time.perf_counter()
            try:
                vectors = self.emb.encode(self.store.text_range(lo, hi))
            except CroupierError as exc:  # carried as data: Ray Data keeps only a traceback's text
                return {"chunk": np.asarray([i]), "seconds": np.asarray([0.0]),
                        "describe": np.asarray([""], dtype=object), "error": np.asarray([_error_row(exc)], dtype=object)}
            secs.append(time.perf_counter() - t0)
            arr[lo:hi] = vectors.astype(np.float16)
            done.append(i)
        arr.flush()
        del arr
        return {"chunk": np.asarray(done, dtype=np.int64), "seconds": np.asarray(secs),
                "describe": np.asarray([json.dumps(self.emb.describe())] * len(done), dtype=object),
                "error": np.asarray([""] * len(done), dtype=object)}


def _embedding_dim(cfg: BuildConfig) -> int:
    """The embedder's dimension, without loading a model (a model's class states it)."""
    from croupier.shards.build.embed import EMBEDDERS

    dim = getattr(EMBEDDERS[cfg.embedder], "dim", None)
    if isinstance(dim, int):
        return dim
    return int(Builder(cfg)._make_embedder().dim)


def _assign_chunk(work: str, centroids: np.ndarray, i: int, chunk: int) -> int:
    from croupier.shards.build.cluster import Assigner

    emb = np.load(Path(work) / "embeddings.npy", mmap_mode="r")
    out = np.load(Path(work) / "assign.npy", mmap_mode="r+")
    lo, hi = i * chunk, min(len(emb), (i + 1) * chunk)
    labels, _ = Assigner(centroids).assign(emb[lo:hi])
    out[lo:hi] = labels
    out.flush()
    return i


def _write_run(cfg: BuildConfig, work: str, parts: list[dict[str, Any]], columns: dict[str, str],
               blocks: list[tuple[int, int]], folder: str, cluster_major: bool) -> dict[str, Any]:
    """Write whole blocks (ranges of the write order) as MDS shards into `folder`.

    The write order is the cluster-major order (`order.npy`), or input order for the
    original layout.
    """
    from streaming import MDSWriter

    from croupier.shards.build.textstore import TextStore

    shutil.rmtree(folder, ignore_errors=True)
    store = TextStore(Path(work) / "parts", parts, cfg.keep_fields)
    order = np.load(Path(work) / "order.npy", mmap_mode="r") if cluster_major else None
    local = Builder(cfg)  # its _write_docs: the very code the local engine writes samples with
    bar = _NoBar()
    c = cfg.chunk
    t0 = time.perf_counter()
    writer = MDSWriter(out=folder, columns=columns, compression=cfg.compression,
                       hashes=["sha1", "xxh64"], size_limit=cfg.shard_size, max_workers=1)
    counts: list[np.ndarray] = []
    try:
        for b0, b1 in blocks:
            if writer.new_samples:
                writer.flush_shard()
                writer._reset_cache()
            for a in range(b0, b1, c):
                ids = np.asarray(order[a:min(b1, a + c)]) if order is not None else np.arange(a, min(b1, a + c))
                got = local._write_docs(writer, store, ids, bar)
                if got is not None:
                    counts.append(got)
        writer.finish()
        if cfg.tokenizer is not None:  # token counts of the run's samples, in write order
            write_npy_atomic(Path(folder) / TOKEN_COUNTS_WORK, np.concatenate(counts) if counts
                             else np.zeros(0, np.int32))
    except BaseException:
        writer.cancel_future_jobs()
        raise
    finally:
        writer.executor.shutdown(wait=True)
    return {"folder": folder, "pid": os.getpid(), "seconds": time.perf_counter() - t0,
            "docs": int(sum(b - a for a, b in blocks))}


# -- the driver -----------------------------------------------------------------------------------

class RayBuilder(Builder):
    """A `Builder` whose heavy stages run on Ray. Use `build_ray(cfg, ...)`."""

    def __init__(self, cfg: BuildConfig, *, address: str | None = None, workers: int | None = None,
                 hook: Hook | None = None) -> None:
        if cfg.adopt is not None:
            raise ConfigError("--engine ray builds from inputs; --adopt runs on the local engine (--engine local)")
        if workers is not None and workers < 1:
            raise ConfigError(f"--ray-workers must be >= 1, got {workers}")
        super().__init__(cfg, hook)
        self.address = address
        self.workers = workers
        self._started_ray = False

    def _full_key(self) -> dict[str, Any]:
        if self._key is None:
            self._key = {**super()._full_key(), "engine": "ray"}
        return self._key

    def _ray(self) -> Any:
        ray = require("ray", "the Ray build engine")
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", configure_logging=True)
            self._started_ray = True
        if self.workers is None:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        return ray

    def _gpus(self) -> int:
        import ray

        return int(ray.cluster_resources().get("GPU", 0))

    def run(self) -> RayBuildResult:
        if not self.cfg.progress:  # --quiet: no per-dataset execution lines from Ray Data either
            import logging

            logging.getLogger("ray.data").setLevel(logging.WARNING)
        ray = self._ray()
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the stages draw their own bars, with rates
        ctx.print_on_execution_start = False
        try:
            res = super().run()
        except Exception as exc:
            inner = _unwrap(exc)
            if inner is not exc:
                raise inner from None
            raise
        finally:
            if self._started_ray:
                ray.shutdown()
        return RayBuildResult(**vars(res), shard_writers=dict(self.state.get("shard_writers", {})),
                              workers=int(self.workers or 0))

    # -- ingest ----------------------------------------------------------------------------------
    def _ingest(self) -> None:
        import ray

        from croupier.shards.build.inputs import expand_inputs

        st = self.state
        if st.get("ingest_done"):
            return
        files = [f"{f}\0{base}" for f, _kind, base in expand_inputs(self.cfg.inputs)]
        ranges = _file_groups(len(files), 4 * int(self.workers or 1))
        done: dict[str, Any] = st.setdefault("ray_ingest", {})
        todo = [g for g in range(len(ranges)) if str(g) not in done]
        folder = self.work / "parts"
        t0 = time.perf_counter()
        bar = self.p.bar("ingest", total=0, initial=sum(sum(p["docs"] for p in d["parts"]) for d in done.values()))
        try:
            if todo:
                ds = ray.data.from_items([{"group": g} for g in todo], override_num_blocks=len(todo)).map(
                    _IngestGroup(self.cfg, files, ranges, str(folder)),
                    compute=ray.data.TaskPoolStrategy(size=max(1, min(int(self.workers or 1), len(todo)))))
                for row in ds.iter_rows():
                    _raise_error_row(row["error"])
                    parts = json.loads(row["parts"])
                    done[str(int(row["group"]))] = {"parts": parts, "skipped": int(row["skipped"]),
                                                    "examples": json.loads(row["examples"])}
                    bar.update(sum(p["docs"] for p in parts))
                    self._commit("ingest", int(row["group"]))
        finally:
            bar.close()
        groups = [done[str(g)] for g in range(len(ranges))]
        st["parts"] = [p for d in groups for p in d["parts"]]
        st["skipped"] = sum(d["skipped"] for d in groups)
        st["bad_examples"] = [e for d in groups for e in d["examples"]][:5]
        n = sum(p["docs"] for p in st["parts"])
        if st["skipped"]:
            self.p.log(f"skipped {st['skipped']} bad records, e.g. " + "; ".join(st["bad_examples"][:3]))
        if n == 0:
            raise DatasetError("the inputs hold no documents" +
                               (f" ({st['skipped']} bad records skipped)" if st["skipped"] else ""))
        st["n"] = n
        st["ingest_done"] = True
        self._timed("ingest", t0, n)
        self._commit("ingest", len(ranges))

    # -- embed -----------------------------------------------------------------------------------
    def _embed(self) -> None:
        import ray

        st = self.state
        if st.get("embed_done"):
            return
        n, c = int(st["n"]), self.cfg.chunk
        path = self.work / "embeddings.npy"
        done: list[int] = st.setdefault("ray_embed_chunks", [])
        if not done or not path.exists():
            done.clear()
            dim = _embedding_dim(self.cfg)
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
            del arr
        nchunks = (n + c - 1) // c
        todo = sorted(set(range(nchunks)) - set(done))
        bar = self.p.bar("embed", total=n, initial=sum(min(n, (i + 1) * c) - i * c for i in done))
        t0 = time.perf_counter()
        encode_s = 0.0
        gpus = self._gpus() if self.cfg.embedder == "minilm" else 0
        try:
            if todo:
                ds = ray.data.from_items([{"chunk": i} for i in todo], override_num_blocks=len(todo)).map_batches(
                    _EmbedActor, batch_size=1,
                    fn_constructor_kwargs={"cfg": self.cfg, "work": str(self.work), "parts": st["parts"], "n": n},
                    compute=ray.data.ActorPoolStrategy(size=max(1, min(int(self.workers or 1), len(todo),
                                                                       gpus or len(todo)))),
                    num_gpus=1 if gpus else 0)
                for row in ds.iter_rows():
                    _raise_error_row(row["error"])
                    i = int(row["chunk"])
                    done.append(i)
                    st["embedder"] = json.loads(row["describe"])
                    encode_s += float(row["seconds"])
                    bar.update(min(n, (i + 1) * c) - i * c)
                    self._commit("embed", i)
        finally:
            bar.close()
        if "embedder" not in st:
            raise DatasetError("the embedding stage finished without describing its embedder; "
                               "pass --overwrite to start over")
        self._timed("embed", t0, n)
        self.timings["embed"]["encode_seconds"] = encode_s
        st["embed_done"] = True
        self._save()

    # -- assign ----------------------------------------------------------------------------------
    def _assign(self) -> None:
        import ray

        st = self.state
        if st.get("assign_done"):
            return
        n, c = int(st["n"]), self.cfg.assign_chunk
        path = self.work / "assign.npy"
        done: list[int] = st.setdefault("ray_assign_chunks", [])
        if not done or not path.exists():
            done.clear()
            del_me = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(n,))
            del del_me
        todo = sorted(set(range((n + c - 1) // c)) - set(done))
        centroids = ray.put(np.load(self.work / "centroids_raw.npy"))
        task = ray.remote(max_retries=TASK_RETRIES)(_assign_chunk)
        bar = self.p.bar("assign", total=n, initial=sum(min(n, (i + 1) * c) - i * c for i in done))
        t0 = time.perf_counter()
        pending = [task.remote(str(self.work), centroids, i, c) for i in todo]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                i = int(ray.get(ready[0]))
                done.append(i)
                bar.update(min(n, (i + 1) * c) - i * c)
                self._commit("assign", i)
        finally:
            cancel_tasks(pending)
            bar.close()
        self._timed("assign", t0, n)
        st["assign_done"] = True
        self._save()

    # -- write -----------------------------------------------------------------------------------
    def _columns(self) -> dict[str, str]:
        """The MDS columns, as the local engine derives them."""
        from croupier.shards.build.textstore import mds_encoding

        types: dict[str, set[str]] = {f: set() for f in self.cfg.keep_fields}
        for p in self.state["parts"]:
            for f, ts in p["types"].items():
                types[f].update(ts)
        columns = {self.cfg.text_field: "str", **{f: mds_encoding(types[f]) for f in self.cfg.keep_fields}}
        if self.cfg.tokenizer is not None:
            from croupier.tokenizer import TOKEN_COLUMN_ENCODING

            self._tokenizer()  # refuse a tokenizer that cannot load before writing anything
            columns[self.cfg.token_field] = TOKEN_COLUMN_ENCODING
        return columns

    def _blocks(self, offsets: np.ndarray) -> list[tuple[int, int]]:
        """The local engine's shard-aligned blocks: ranges of the cluster-major order."""
        st = self.state
        n = int(st["n"])
        if self.cfg.layout != "cluster-major":
            return [(0, n)]
        cbytes = self._cluster_bytes(self._store(), offsets)
        block = st.setdefault(
            "block_size", max(1, int(0.75 * self.cfg.shard_size * n / max(1.0, float(cbytes.sum())))))
        out = []
        for k in range(len(offsets) - 1):
            lo, hi = int(offsets[k]), int(offsets[k + 1])
            out.extend((b0, min(hi, b0 + block)) for b0 in range(lo, hi, block))
        return out

    def _write(self) -> None:
        import ray

        st = self.state
        if st.get("write_done"):
            return
        cluster_major = self.cfg.layout == "cluster-major"
        n = int(st["n"])
        offsets = np.load(self.work / "offsets.npy")
        columns = st.setdefault("columns", self._columns())
        blocks = self._blocks(offsets)
        runs = write_runs(blocks, 4 * int(self.workers or 1)) if cluster_major else [(0, len(blocks))]
        done: dict[str, Any] = st.setdefault("ray_write", {})
        mds = self.work / "mds"
        task = ray.remote(max_retries=TASK_RETRIES)(_write_run)
        todo = [r for r in range(len(runs)) if str(r) not in done]
        bar = self.p.bar("write", total=n, initial=sum(d["docs"] for d in done.values()))
        t0 = time.perf_counter()
        refs = {task.remote(self.cfg, str(self.work), st["parts"], columns, blocks[runs[r][0]:runs[r][1]],
                            str(mds / f"run{r:05d}"), cluster_major): r for r in todo}
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                info = ray.get(ready[0])
                done[str(refs[ready[0]])] = {"pid": int(info["pid"]), "docs": int(info["docs"])}
                bar.update(int(info["docs"]))
                self._commit("write", refs[ready[0]])
        finally:
            cancel_tasks(pending)
            bar.close()
        self._merge_runs(mds, len(runs), done, [blocks[a][0] for a, _ in runs])
        self._timed("write", t0, n)
        if cluster_major:
            self._write_arrays_cluster_major(np.load(self.work / "order.npy", mmap_mode="r"), offsets)
        else:
            self._write_arrays_original()
        st["write_done"] = True
        self._commit("write", len(runs))

    def _merge_runs(self, mds: Path, runs: int, done: dict[str, Any], starts: list[int]) -> None:
        """Rename every run's shards into one sequence and write the index MDSWriter would have
        (with --tokenizer, the runs' token counts first, each at its run's first write position).

        Idempotent: a merge killed after writing the index is not redone.
        """
        if (mds / INDEX_BASENAME).exists():
            return
        if self.cfg.tokenizer is not None:
            counts = np.zeros(int(self.state["n"]), dtype=np.int32)
            for r in range(runs):
                part = np.load(mds / f"run{r:05d}" / TOKEN_COUNTS_WORK)
                counts[starts[r]:starts[r] + len(part)] = part
            write_npy_atomic(self.work / TOKEN_COUNTS_WORK, counts)
        shards: list[dict[str, Any]] = []
        writers: dict[str, int] = {}
        for r in range(runs):
            folder = mds / f"run{r:05d}"
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
        self.state["shard_writers"] = writers
        self._save()
        write_bytes_atomic(mds / INDEX_BASENAME, json.dumps({"version": 2, "shards": shards}, sort_keys=True).encode())
        for r in range(runs):
            shutil.rmtree(mds / f"run{r:05d}", ignore_errors=True)


def build_ray(cfg: BuildConfig, *, address: str | None = None, workers: int | None = None,
              hook: Hook | None = None) -> RayBuildResult:
    """Run or resume a build on Ray (a running cluster at `address`, else the current or a local one)."""
    return RayBuilder(cfg, address=address, workers=workers, hook=hook).run()
