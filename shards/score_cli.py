"""`croupier shards score DIR --by askllm|density|perplexity`: per-sample score columns.

Scores land in the dataset's sidecar as float32 columns (`Sidecar.write_scores`) with the
scorer's parameters in the manifest. Work in progress lives in
`DIR/croupier/scoring/NAME/` (see `scoring.ChunkedRun`) until the column is stored: an
interrupted run (crash, Ctrl-C, endpoint outage) keeps its finished chunks and the same
command resumes it; two runs on the same NAME at once are refused.

- density: two streaming passes over the memory-mapped embeddings (`density.py`); the
  sketch after pass 1 is saved too, so a resume skips it.
- askllm: `--model PATH` (local Hugging Face model, GPU when present) or `--endpoint URL`
  (OpenAI-compatible server) reads each document's text column inside the paper's prompt.
- perplexity: `--model PATH`, a small causal LM; mean token NLL.

`--engine ray` runs density as Ray tasks (`ray_score.py`, the same scores bit for bit) and
askllm/perplexity with `--model` on a Ray Data actor pool (`ray_lm_score.py`, the same
scores up to float rounding); both keep their progress in the same work folder as locally.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError
from croupier.format.atomic import atomic_path
from croupier.shards.density import DensityParams, DensitySketch, suggest_bandwidth
from croupier.shards.scoring import ChunkedRun, Progress, ShardTextReader, run_chunked

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
    if emb.ndim != 2 or len(emb) != sidecar.num_samples:
        raise DatasetError(f"stored embeddings have shape {emb.shape}, expected "
                           f"({sidecar.num_samples}, d)")
    return emb


def score_density(sidecar: Any, name: str, *, rows: int = 1000, buckets: int = 20000,
                  bandwidth: float | str = "auto", hashes_per_row: int = 2, seed: int = 0,
                  chunk_size: int | None = None, progress: bool = True, engine: str = "local",
                  ray_address: str | None = None) -> tuple[np.ndarray, dict]:
    """Two-pass sketch density of every stored embedding; resumable (see module doc).

    `engine="ray"` runs both passes as Ray tasks (`ray_score.py`): the same scores.
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
            from croupier.shards.ray_score import ray_density_passes

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
    start_chunk = 0
    if run.resumed and sketch_file.is_file():
        with np.load(sketch_file) as z:
            sketch.counts[:] = z["counts"]
            start_chunk = int(z["next_chunk"])
            sketch.num_added = int(z["num_added"])
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
                    _save_sketch(sketch_file, sketch, c + 1)
                    last_save = time.monotonic()
        finally:
            bar.close()
    return run_chunked(run, lambda a, b: sketch.query(emb[a:b]),
                       label="density pass 2/2 (query)", progress=progress)


def _save_sketch(path: Path, sketch: DensitySketch, next_chunk: int) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, counts=sketch.counts, next_chunk=np.int64(next_chunk),
                     num_added=np.int64(sketch.num_added))


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
    import shutil

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
        from croupier.shards.askllm_http import HTTPAskLLM
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        return HTTPAskLLM(args.endpoint, args.endpoint_model, batch_size=args.batch_size or 16,
                          timeout=args.timeout, retries=args.retries, top_logprobs=args.top_logprobs,
                          max_chars=args.max_chars, api_key=key, concurrency=args.concurrency)
    from croupier.shards.askllm import AskLLMScorer
    return AskLLMScorer(args.model, batch_size=args.batch_size or 16, max_length=args.max_length,
                        device=args.device, dtype=args.dtype)


def make_perplexity(args: argparse.Namespace, *, check_only: bool = False) -> Any:
    """The local perplexity scorer from the command's flags (check_only: refuse bad flags, load nothing)."""
    if not args.model or args.endpoint:
        raise ConfigError("perplexity needs --model PATH_OR_NAME (a local causal LM); --endpoint "
                          "is for askllm only")
    if check_only:
        return None
    from croupier.shards.perplexity import PerplexityScorer
    return PerplexityScorer(args.model, batch_size=args.batch_size or 8, max_length=args.max_length,
                            device=args.device, dtype=args.dtype)


# -- command --------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from croupier.shards.sidecar import Sidecar, validate_name

    by = check_scorer(args.by)
    name = validate_name("score", args.name or by)
    sidecar = Sidecar.open(args.dir)
    progress = not args.no_progress
    if args.restart:
        discard_work(sidecar, name)
    t0 = time.monotonic()
    if args.engine != "ray" and (args.ray_address is not None or args.ray_workers is not None):
        raise ConfigError("--ray-address and --ray-workers apply to --engine ray only")
    if by == "density" and args.ray_workers is not None:
        raise ConfigError(f"--ray-workers sizes the askllm/perplexity actor pool; density uses every Ray CPU, "
                          f"got --ray-workers {args.ray_workers}")
    actors: dict[int, int] = {}
    if by == "density":
        bw = args.bandwidth if args.bandwidth == "auto" else _positive_float(args.bandwidth, "bandwidth")
        values, record = score_density(sidecar, name, rows=args.rows, buckets=args.buckets,
                                       bandwidth=bw, hashes_per_row=args.hashes_per_row,
                                       seed=args.seed, chunk_size=args.chunk_size, progress=progress,
                                       engine=args.engine, ray_address=args.ray_address)
    elif args.engine == "ray":
        from croupier.shards.ray_lm_score import ray_text_scores

        (make_askllm if by == "askllm" else make_perplexity)(args, check_only=True)
        res = ray_text_scores(sidecar, name, by, args, text_field=args.text_field, chunk_size=args.chunk_size,
                              progress=progress, address=args.ray_address, workers=args.ray_workers)
        values, record, actors = res.values, res.record, res.actors
    else:
        scorer = make_askllm(args) if by == "askllm" else make_perplexity(args)
        record = {"scorer": by, **scorer.params(), "text_field": args.text_field}
        values = score_texts(sidecar, name, scorer, record, text_field=args.text_field,
                             chunk_size=args.chunk_size, progress=progress, label=by)
    if by == "perplexity":
        bad = ~np.isfinite(values)
        values = np.where(bad, np.float32(UNSCORABLE), values).astype(np.float32)
        record = {**record, "unscorable": int(bad.sum()), "unscorable_value": UNSCORABLE}
    elapsed = time.monotonic() - t0
    stored = {**record, "elapsed_s": round(elapsed, 3)}
    if args.engine == "ray" and by != "density":
        stored.update(engine="ray", ray_actors=len(actors), ray_chunks_scored=sum(actors.values()))
    sidecar.write_scores(name, values, stored)
    discard_work(sidecar, name)
    print(f"score {name!r} ({by}): {len(values):,} samples in {elapsed:,.1f} s "
          f"({len(values) / max(elapsed, 1e-9):,.0f} samples/s); min {values.min():.4g}, "
          f"median {float(np.median(values)):.4g}, max {values.max():.4g}")
    return 0


def _positive_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"{what} must be a number or 'auto', got {text!r}") from None
    if not v > 0:
        raise ConfigError(f"{what} must be > 0, got {text!r}")
    return v


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "score", help="score every sample (askllm, density, perplexity) into the sidecar",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="MDS dataset folder with a croupier sidecar")
    p.add_argument("--by", required=True, metavar="SCORER", help=f"one of: {', '.join(SCORERS)}")
    p.add_argument("--name", help="score column name (default: the scorer's name)")
    p.add_argument("--chunk-size", type=int, help="samples per resumable chunk")
    p.add_argument("--restart", action="store_true", help="discard a partial run and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--engine", default="local", choices=("local", "ray"),
                   help="local (default) or ray (density: both sketch passes as Ray tasks; askllm and "
                        "perplexity: a Ray Data actor pool, one model per actor; the same scores)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else local)")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="askllm/perplexity actors on Ray (default: one per GPU, else one per CPU)")
    d = p.add_argument_group("density")
    d.add_argument("--rows", type=int, default=1000, help="sketch rows R (default 1000)")
    d.add_argument("--buckets", type=int, default=20000, help="buckets per row B (default 20000)")
    d.add_argument("--bandwidth", default="auto",
                   help="p-stable hash width in embedding units, or 'auto' (default)")
    d.add_argument("--hashes-per-row", type=int, default=2, help="hashes concatenated per row (default 2)")
    d.add_argument("--seed", type=int, default=0, help="sketch seed (default 0)")
    m = p.add_argument_group("askllm / perplexity")
    m.add_argument("--model", help="local Hugging Face model folder or cached name (offline)")
    m.add_argument("--endpoint", help="OpenAI-compatible server URL (askllm only)")
    m.add_argument("--endpoint-model", help="model name to ask the endpoint for (default: its first)")
    m.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key (if set)")
    m.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")
    m.add_argument("--retries", type=int, default=3, help="HTTP retries before failing (default 3)")
    m.add_argument("--concurrency", type=int, default=4, help="HTTP requests in flight (default 4)")
    m.add_argument("--top-logprobs", type=int, default=20, help="logprobs to request (default 20)")
    m.add_argument("--max-chars", type=int, default=12000,
                   help="endpoint: characters of each example kept (default 12000)")
    m.add_argument("--batch-size", type=int, help="examples per forward pass / request")
    m.add_argument("--max-length", type=int, default=512, help="tokens per prompt (default 512)")
    m.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1...")
    m.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
    m.add_argument("--text-field", default="text", help="MDS column holding the text (default text)")
    p.set_defaults(func=run)


__all__ = ["SCORERS", "check_scorer", "score_density", "score_texts", "discard_work", "register", "run"]
