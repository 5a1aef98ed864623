"""`croupier shards score --by askllm|perplexity --engine ray`: model scoring on a Ray actor pool.

The local scorer (`scorers.score_texts`) walks the dataset's text column chunk by chunk
with one model. This engine hands the same chunks to a Ray Data actor pool: each actor
builds the local scorer once (`make_askllm` / `make_perplexity`: the same prompt building,
the same model calls, the model loaded once per actor, on the actor's GPU when the cluster
has GPUs) and reads its chunks' texts with the local `ShardTextReader`. Each chunk's scores
come back to the driver, which stores them in the local engine's `ChunkedRun` work folder:
an interrupted run resumes on either engine, losing only the chunks in flight. Chunks are
handed out once every actor has loaded its model (`POOL_START_S` at most), so a short run is
not left to the first actor ready.

Before the pool starts, one Ray task with an actor's resources builds the scorer to read its
parameters (resolved dtype, "yes" token ids...) for the run's record, and to refuse a bad
model or flag before any actor starts (a second model load, the price of a record equal to
the local one). A scorer error (bad model, bad flag) is carried back as data and raised on
the driver as the local engine raises it. The dataset folder must be visible to every Ray
node (one machine, or a shared filesystem).

Scores equal the local engine's up to floating-point differences between thread counts and
devices (the chunks and the batches inside them are the same; tests use rtol 1e-5).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from croupier.errors import ConfigError, CroupierError
from croupier.optional import require
from croupier.shards.ray_errors import error_row, raise_error_row, unwrap

POOL_START_S = 3600
"""Seconds the actor pool may take to load its models before the run fails."""


@dataclass
class RayLMScores:
    """The scores (float32, N), the record, and which actor processes scored chunks (pid -> chunks)."""

    values: np.ndarray
    record: dict
    actors: dict[int, int] = field(default_factory=dict)


def _raise(text: str) -> None:
    """Re-raise a scorer error carried as data, with the local engine's exception type."""
    import json

    if text and json.loads(text)["type"] == "ModelLoadError":
        from croupier.shards.scoring.askllm import ModelLoadError

        raise ModelLoadError(json.loads(text)["message"])
    raise_error_row(text)


def _make_scorer(by: str, options: argparse.Namespace) -> Any:
    from croupier.shards.scoring.scorers import make_askllm, make_perplexity

    return make_askllm(options) if by == "askllm" else make_perplexity(options)


def _probe(by: str, options: argparse.Namespace) -> str:
    """The scorer's params as JSON, or an error row: built where an actor would be."""
    import json

    try:
        return json.dumps({"params": _make_scorer(by, options).params()})
    except CroupierError as exc:
        return json.dumps({"error": error_row(exc)})


class _ScoreActor:
    """Ray Data actor: builds the scorer once, scores whole chunks of the text column."""

    def __init__(self, by: str, options: argparse.Namespace, root: str, text_field: str,
                 chunk_size: int, n: int) -> None:
        from croupier.shards.scoring.lm_scores import ShardTextReader

        self.scorer = _make_scorer(by, options)
        self.reader = ShardTextReader(root, text_field)
        self.chunk_size, self.n = chunk_size, n

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        chunks, blobs, errors = [], [], []
        try:
            for c in np.asarray(batch["chunk"]).tolist():
                a, b = c * self.chunk_size, min(self.n, (c + 1) * self.chunk_size)
                try:
                    values = np.asarray(self.scorer.score(self.reader.texts(a, b)), dtype=np.float32)
                    blobs.append(values.tobytes())
                    errors.append("")
                except CroupierError as exc:  # Ray Data keeps only a traceback's text: carry it as data
                    blobs.append(b"")
                    errors.append(error_row(exc))
                chunks.append(c)
        finally:
            # Ray ends pool actors without running their cleanup: no decompressed shard (a
            # temporary folder of the reader's) may outlive the call
            self.reader.close()
        return {"chunk": np.asarray(chunks, dtype=np.int64), "scores": np.asarray(blobs, dtype=object),
                "error": np.asarray(errors, dtype=object), "pid": np.full(len(chunks), os.getpid())}


def ray_text_scores(sidecar: Any, name: str, by: str, options: argparse.Namespace, *,
                    text_field: str = "text", chunk_size: int | None = None, progress: bool = True,
                    address: str | None = None, workers: int | None = None) -> RayLMScores:
    """Score the text column with `by` on a Ray actor pool, resumably (see module doc)."""
    import json

    from croupier.errors import DatasetError
    from croupier.shards.scoring.lm_scores import ChunkedRun, Progress, ShardTextReader
    from croupier.shards.scoring.scorers import DEFAULT_CHUNK, work_dir

    if by not in ("askllm", "perplexity"):
        raise ConfigError(f"the Ray model scorer runs askllm or perplexity, got {by!r}")
    if getattr(options, "endpoint", None):
        raise ConfigError("--engine ray scores with a local model (--model); an --endpoint is already a "
                          "server: score it with --engine local and raise --concurrency")
    if workers is not None and workers < 1:
        raise ConfigError(f"--ray-workers must be >= 1, got {workers}")
    with ShardTextReader(sidecar.root, text_field) as reader:  # refuses a missing column, as locally
        n = reader.num_samples
    if n != sidecar.num_samples:
        raise DatasetError(f"the MDS index lists {n} samples but the sidecar {sidecar.num_samples}")
    ray = require("ray", "the Ray scoring engine")
    started = False
    wait_before = None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        started = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Chunks go out once every actor has its model: an actor still loading would otherwise
        # leave the whole (short) run to the first one ready. A cluster that cannot place the
        # pool fails after POOL_START_S instead of waiting forever.
        wait_before = ctx.wait_for_min_actors_s
        ctx.wait_for_min_actors_s = POOL_START_S
        gpus = int(ray.cluster_resources().get("GPU", 0)) if getattr(options, "device", "auto") != "cpu" else 0
        pool = workers or (gpus or max(1, int(ray.cluster_resources().get("CPU", 1))))
        probe = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(_probe)
        got = json.loads(ray.get(probe.remote(by, options)))
        if "error" in got:
            _raise(got["error"])
        record = {"scorer": by, **got["params"], "text_field": text_field}
        chunk = int(chunk_size or DEFAULT_CHUNK[by])
        actors: dict[int, int] = {}
        with ChunkedRun(work_dir(sidecar, name), n, chunk, record) as run:
            todo = [int(c) for c in run.pending()]
            if todo:
                bar = Progress(run.n, f"{by} (ray, {min(pool, len(todo))} actors)", initial=run.done_samples(),
                               enabled=progress)
                try:
                    ds = ray.data.from_items([{"chunk": c} for c in todo], override_num_blocks=len(todo)).map_batches(
                        _ScoreActor, batch_size=1,
                        fn_constructor_kwargs={"by": by, "options": options, "root": str(sidecar.root),
                                               "text_field": text_field, "chunk_size": chunk, "n": n},
                        compute=ray.data.ActorPoolStrategy(size=max(1, min(pool, len(todo))),
                                                           max_tasks_in_flight_per_actor=1),
                        num_gpus=1 if gpus else 0, num_cpus=1)
                    for row in ds.iter_rows():
                        _raise(row["error"])
                        c = int(row["chunk"])
                        run.write(c, np.frombuffer(row["scores"], dtype=np.float32))
                        pid = int(row["pid"])
                        actors[pid] = actors.get(pid, 0) + 1
                        a, b = run.bounds(c)
                        bar.update(b - a)
                except Exception as exc:
                    inner = unwrap(exc)
                    if inner is not exc:
                        raise inner from None
                    raise
                finally:
                    bar.close()
            values = run.result()
        return RayLMScores(values=values, record=record, actors=actors)
    finally:
        if wait_before is not None and ray.is_initialized():
            ray.data.DataContext.get_current().wait_for_min_actors_s = wait_before
        if started:
            ray.shutdown()


__all__ = ["RayLMScores", "ray_text_scores"]
