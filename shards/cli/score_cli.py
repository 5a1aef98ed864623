"""`croupier shards score DIR --by askllm|density|perplexity | --from-field FIELD | --from-file FILE.npy`.

Per-sample score columns: computed by a scorer, or a score you already have (a kept field or
a .npy, `croupier.shards.scoring.external`; `--lower-is-better` when lower values are better).

Scores land in the dataset's sidecar as float32 columns (`Sidecar.write_scores`) with the
scorer's parameters in the manifest (`croupier.shards.scoring.scorers.score_and_store`). Work
in progress lives in `DIR/croupier/scoring/NAME/` (see `lm_scores.ChunkedRun`) until the column is stored: an
interrupted run (crash, Ctrl-C, endpoint outage) keeps its finished chunks and the same
command resumes it; two runs on the same NAME at once are refused.

- density: two streaming passes over the memory-mapped embeddings (`scoring/density.py`); the
  sketch after pass 1 is saved too, so a resume skips it.
- askllm: `--model PATH` (local Hugging Face model, GPU when present) or `--endpoint URL`
  (OpenAI-compatible server) reads each document's text column inside the paper's prompt.
- perplexity: `--model PATH`, a small causal LM; mean token NLL.

`--engine ray` runs density as Ray tasks (`scoring/ray_score.py`, the same scores bit for bit) and
askllm/perplexity with `--model` on a Ray Data actor pool (`scoring/ray_lm_score.py`, the same
scores up to float rounding); both keep their progress in the same work folder as locally.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from croupier.shards.scoring.scorers import ENGINES, SCORERS, score_and_store


def run(args: argparse.Namespace) -> int:
    from croupier.errors import ConfigError

    if args.from_field is not None or args.from_file is not None:
        if args.by is not None:
            raise ConfigError(f"--by {args.by} computes a score; --from-field/--from-file store one you have: "
                              "give one of them")
        from croupier.shards.scoring.external import store_external

        name, values, record = store_external(args.dir, field=args.from_field, file=args.from_file, name=args.name,
                                              lower_is_better=args.lower_is_better, column=args.column, key=args.key)
        source = f"field {record['field']!r}" if record["from"] == "field" else f"file {record['file']}"
        print(f"score {name!r} (from the {source}, {'higher' if record['higher_is_better'] else 'lower'} is "
              f"better): {len(values):,} samples; min {values.min():.4g}, median {float(np.median(values)):.4g}, "
              f"max {values.max():.4g}")
        return 0
    if args.column is not None or args.key is not None:
        raise ConfigError("--column and --key apply to --from-file FILE.parquet")
    if args.lower_is_better:
        raise ConfigError("--lower-is-better applies to --from-field/--from-file (a computed score knows its "
                          "direction)")
    if args.by is None:
        raise ConfigError(f"give --by SCORER ({', '.join(SCORERS)}) or --from-field FIELD / --from-file FILE.npy")
    got = score_and_store(args.dir, args.by, args, name=args.name, engine=args.engine, ray_address=args.ray_address,
                          ray_workers=args.ray_workers, restart=args.restart, progress=not args.no_progress)
    values, elapsed = got.values, got.elapsed_s
    print(f"score {got.name!r} ({args.by}): {len(values):,} samples in {elapsed:,.1f} s "
          f"({len(values) / max(elapsed, 1e-9):,.0f} samples/s); min {values.min():.4g}, "
          f"median {float(np.median(values)):.4g}, max {values.max():.4g}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "score", help="score every sample (askllm, density, perplexity) into the sidecar",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="MDS dataset folder with a croupier sidecar")
    p.add_argument("--by", default=None, metavar="SCORER", help=f"one of: {', '.join(SCORERS)}")
    p.add_argument("--from-field", default=None, metavar="FIELD",
                   help="store a score you have: a kept numeric field of the dataset (a quality classifier's "
                        "probability, an educational grade, your own perplexity...)")
    p.add_argument("--from-file", default=None, metavar="FILE",
                   help="store a score you have: a .npy array of one number per sample id, or a Parquet file's "
                        "--column (its SHA-256 recorded)")
    p.add_argument("--column", default=None, help="with --from-file FILE.parquet: the score column")
    p.add_argument("--key", default=None, metavar="FIELD",
                   help="with --from-file FILE.parquet: join the file's FIELD column on the dataset's kept FIELD "
                        "(scores in any order, e.g. input order for a cluster-major dataset)")
    p.add_argument("--lower-is-better", action="store_true",
                   help="with --from-field/--from-file: lower values are better (default: higher)")
    p.add_argument("--name", help="score column name (default: the scorer's name, the field, or the file's stem)")
    p.add_argument("--chunk-size", type=int, help="samples per resumable chunk")
    p.add_argument("--restart", action="store_true", help="discard a partial run and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--engine", default="local", choices=ENGINES,
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


__all__ = ["register", "run"]
