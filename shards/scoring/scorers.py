"""The scorers behind `croupier shards score`: density, Ask-LLM and perplexity runs.

Scores land in the dataset's sidecar as float32 columns (`Sidecar.write_scores`) with the
scorer's parameters in the manifest. Work in progress lives in
`DIR/croupier/scoring/NAME/` (see `lm_scores.ChunkedRun`) until the column is stored: an
interrupted run keeps its finished chunks and the same call resumes it.

- density: two streaming passes over the memory-mapped embeddings (`density.py`); the
  sketch after pass 1 is saved (`density.save_sketch`), so a resume skips it.
- askllm / perplexity: each document's text column through a local model or an endpoint.
The Ray engine (`croupier.shards.scoring.ray_score`, `croupier.shards.scoring.ray_lm_score`)
keeps its progress in the same work folder. `score_and_store` is the whole command: score
on the chosen engine, store the column, drop the work folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError
from croupier.shards.scoring.density import DensityParams, DensitySketch, load_sketch, save_sketch, suggest_bandwidth
from croupier.shards.scoring.lm_scores import ChunkedRun, Progress, ShardTextReader, run_chunked

SCORERS: tuple[str, ...] = ("askllm", "density", "perplexity")
DEFAULT_CHUNK = {"density": 4096, "askllm": 512, "perplexity": 512}
SKETCH_SAVE_EVERY_S = 30.0
UNSCORABLE = float(np.finfo(np.float32).max)


def check_scorer(by: str) -> str:
    if by not in SCORERS:
        raise ConfigError(f"unknown scorer {by!r}; valid: {', '.join(SCORERS)}")
    return by


def work_dir(sidecar: Any, name: str) -> Path:
    return Path(sidecar.dir) / "scoring" / name


# -- density ------------------------------------------------------------------------------
def _embeddings(sidecar: Any) -> np.ndarray:
    try:
        emb = sidecar.embeddings()
    except DatasetError as exc:
        raise DatasetError(
            f"density needs the stored embeddings of {str(sidecar.root)!r}, and they are missing "
            f"({exc}); rebuild the sidecar with an embedder (`croupier shards build`)"
        ) from None
    if emb.ndim == 2 and emb.shape[1] == 0:
        raise DatasetError(f"density needs embeddings, and {str(sidecar.root)!r} was built without any "
                           "(--embedder none); rebuild it with an embedder or --embeddings")
    if emb.ndim != 2 or len(emb) != sidecar.num_samples:
        raise DatasetError(f"stored embeddings have shape {emb.shape}, expected "
                           f"({sidecar.num_samples}, d)")
    return emb


def score_density(sidecar: Any, name: str, *, rows: int = 1000, buckets: int = 20000,
                  bandwidth: float | str = "auto", hashes_per_row: int = 2, seed: int = 0,
                  chunk_size: int | None = None, progress: bool = True, engine: str = "local",
                  ray_address: str | None = None) -> tuple[np.ndarray, dict]:
    """Two-pass sketch density of every stored embedding; resumable (see module doc).

    `engine="ray"` runs both passes as Ray tasks (`croupier.shards.scoring.ray_score`): the same scores.
    """
    emb = _embeddings(sidecar)
    if bandwidth == "auto":
        bw = suggest_bandwidth(emb, seed=seed)
    else:
        bw = float(bandwidth)
    params = DensityParams(rows=rows, buckets=buckets, bandwidth=bw, hashes_per_row=hashes_per_row,
                           seed=seed)
    record = {"scorer": "density", **params.to_dict(), "bandwidth_rule": (
        "auto: median 10-NN distance in a 2048 sample" if bandwidth == "auto" else "given"),
        "score": "mean bucket count over rows (self included)"}
    chunk = int(chunk_size or DEFAULT_CHUNK["density"])
    with ChunkedRun(work_dir(sidecar, name), len(emb), chunk, record) as run:
        if engine == "ray":
            from croupier.format.sidecar_layout import EMBEDDINGS, array_file
            from croupier.shards.scoring.ray_score import ray_density_passes

            values = ray_density_passes(run, Path(sidecar.dir) / array_file(sidecar.manifest, EMBEDDINGS),
                                        emb.shape[1], params, address=ray_address, progress=progress)
        else:
            values = _density_passes(run, emb, params, progress)
    return values, record


def _density_passes(run: ChunkedRun, emb: np.ndarray, params: DensityParams,
                    progress: bool) -> np.ndarray:
    chunk = run.chunk_size
    sketch = DensitySketch(emb.shape[1], params)
    sketch_file = run.dir / "sketch.npz"
    start_chunk = load_sketch(sketch_file, sketch) if run.resumed else 0
    if start_chunk < run.num_chunks:
        bar = Progress(run.n, "density pass 1/2 (sketch)", initial=min(run.n, start_chunk * chunk),
                       enabled=progress, unit="embeddings")
        last_save = time.monotonic()
        try:
            for c in range(start_chunk, run.num_chunks):
                a, b = run.bounds(c)
                sketch.add(emb[a:b])
                bar.update(b - a)
                if time.monotonic() - last_save > SKETCH_SAVE_EVERY_S or c == run.num_chunks - 1:
                    save_sketch(sketch_file, sketch, c + 1)
                    last_save = time.monotonic()
        finally:
            bar.close()
    return run_chunked(run, lambda a, b: sketch.query(emb[a:b]),
                       label="density pass 2/2 (query)", progress=progress)


# -- language-model scorers ---------------------------------------------------------------
def score_texts(sidecar: Any, name: str, scorer: Any, record: dict, *, text_field: str = "text",
                chunk_size: int | None = None, progress: bool = True, label: str) -> np.ndarray:
    """Run `scorer.score(texts)` over the dataset's text column, chunk by chunk, resumably."""
    with ShardTextReader(sidecar.root, text_field) as reader:
        if reader.num_samples != sidecar.num_samples:
            raise DatasetError(f"the MDS index lists {reader.num_samples} samples but the sidecar "
                               f"{sidecar.num_samples}")
        chunk = int(chunk_size or DEFAULT_CHUNK["askllm"])
        with ChunkedRun(work_dir(sidecar, name), reader.num_samples, chunk, record) as run:
            values = run_chunked(run, lambda a, b: scorer.score(reader.texts(a, b)), label=label,
                                 progress=progress)
    return values


def discard_work(sidecar: Any, name: str) -> None:
    """Delete a finished run's work folder (once its scores are stored in the sidecar)."""
    work = work_dir(sidecar, name)
    shutil.rmtree(work, ignore_errors=True)
    work.with_name(work.name + ".lock").unlink(missing_ok=True)


def make_askllm(args: argparse.Namespace, *, check_only: bool = False) -> Any:
    """The Ask-LLM scorer from the command's flags (check_only: refuse bad flags, load nothing)."""
    if bool(args.model) == bool(args.endpoint):
        raise ConfigError("askllm needs exactly one of --model PATH_OR_NAME (local) or --endpoint URL")
    if check_only:
        return None
    if args.endpoint:
        from croupier.shards.scoring.askllm_http import HTTPAskLLM
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        return HTTPAskLLM(args.endpoint, args.endpoint_model, batch_size=args.batch_size or 16,
                          timeout=args.timeout, retries=args.retries, top_logprobs=args.top_logprobs,
                          max_chars=args.max_chars, api_key=key, concurrency=args.concurrency)
    from croupier.shards.scoring.askllm import AskLLMScorer
    return AskLLMScorer(args.model, batch_size=args.batch_size or 16, max_length=args.max_length,
                        device=args.device, dtype=args.dtype)


def make_perplexity(args: argparse.Namespace, *, check_only: bool = False) -> Any:
    """The local perplexity scorer from the command's flags (check_only: refuse bad flags, load nothing)."""
    if not args.model or args.endpoint:
        raise ConfigError("perplexity needs --model PATH_OR_NAME (a local causal LM); --endpoint "
                          "is for askllm only")
    if check_only:
        return None
    from croupier.shards.scoring.perplexity import PerplexityScorer
    return PerplexityScorer(args.model, batch_size=args.batch_size or 8, max_length=args.max_length,
                            device=args.device, dtype=args.dtype)


# -- the whole command ----------------------------------------------------------------------
ENGINES = ("local", "ray")


@dataclass
class StoredScores:
    """A score column stored in the sidecar: its values, the manifest record, the time it took."""

    name: str
    values: np.ndarray
    record: dict
    elapsed_s: float
    actors: dict[int, int] = field(default_factory=dict)
    """With askllm/perplexity on Ray: actor pid -> chunks it scored."""


def parse_bandwidth(text: str) -> float | str:
    """--bandwidth: 'auto' or a positive number."""
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"bandwidth must be a number or 'auto', got {text!r}") from None
    if not v > 0:
        raise ConfigError(f"bandwidth must be > 0, got {text!r}")
    return v


def score_and_store(dataset: str, by: str, options: argparse.Namespace, *, name: str | None = None,
                    engine: str = "local", ray_address: str | None = None, ray_workers: int | None = None,
                    restart: bool = False, progress: bool = True) -> StoredScores:
    """Score every sample of `dataset` with `by` (`options`: the command's scorer flags) and store the column.

    `restart` discards a partial run first. Perplexity's non-finite scores (a text with no
    token to score) are stored as `UNSCORABLE` and counted in the record.
    """
    from croupier.format.sidecar import Sidecar, validate_name

    by = check_scorer(by)
    name = validate_name("score", name or by)
    sidecar = Sidecar.open(dataset)
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; valid engines: {', '.join(ENGINES)}")
    if restart:
        discard_work(sidecar, name)
    t0 = time.monotonic()
    if engine != "ray" and (ray_address is not None or ray_workers is not None):
        raise ConfigError("--ray-address and --ray-workers apply to --engine ray only")
    if by == "density" and ray_workers is not None:
        raise ConfigError(f"--ray-workers sizes the askllm/perplexity actor pool; density uses every Ray CPU, "
                          f"got --ray-workers {ray_workers}")
    actors: dict[int, int] = {}
    if by == "density":
        values, record = score_density(sidecar, name, rows=options.rows, buckets=options.buckets,
                                       bandwidth=parse_bandwidth(options.bandwidth),
                                       hashes_per_row=options.hashes_per_row, seed=options.seed,
                                       chunk_size=options.chunk_size, progress=progress, engine=engine,
                                       ray_address=ray_address)
    elif engine == "ray":
        from croupier.shards.scoring.ray_lm_score import ray_text_scores

        (make_askllm if by == "askllm" else make_perplexity)(options, check_only=True)
        res = ray_text_scores(sidecar, name, by, options, text_field=options.text_field,
                              chunk_size=options.chunk_size, progress=progress, address=ray_address,
                              workers=ray_workers)
        values, record, actors = res.values, res.record, res.actors
    else:
        scorer = make_askllm(options) if by == "askllm" else make_perplexity(options)
        record = {"scorer": by, **scorer.params(), "text_field": options.text_field}
        values = score_texts(sidecar, name, scorer, record, text_field=options.text_field,
                             chunk_size=options.chunk_size, progress=progress, label=by)
    if by == "perplexity":
        bad = ~np.isfinite(values)
        values = np.where(bad, np.float32(UNSCORABLE), values).astype(np.float32)
        record = {**record, "unscorable": int(bad.sum()), "unscorable_value": UNSCORABLE}
    elapsed = time.monotonic() - t0
    stored = {**record, "elapsed_s": round(elapsed, 3)}
    if engine == "ray" and by != "density":
        stored.update(engine="ray", ray_actors=len(actors), ray_chunks_scored=sum(actors.values()))
    sidecar.write_scores(name, values, stored)
    discard_work(sidecar, name)
    return StoredScores(name=name, values=values, record=stored, elapsed_s=elapsed, actors=actors)
