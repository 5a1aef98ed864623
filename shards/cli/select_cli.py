"""`croupier shards select DIR [--by SELECTOR_OR_SCORE --keep F | --threshold T] [--where EXPR] [--within SEL]`.

Turns scores and filters into a named subset stored in the sidecar (`Sidecar.write_selection`):

- `--by askllm|density|perplexity|random --keep F`: Ask-LLM keeps the top-k, perplexity the
  lowest-k, density k by inverse propensity (probability proportional to 1/density, without
  replacement), random k uniformly;
- `--by NAME --keep F | --threshold T`: a score column stored with `croupier shards score
  --from-field/--from-file` keeps its best samples (the top fraction, or every sample at least
  as good as T; higher is better unless the score was stored with --lower-is-better);
- `--where EXPR --name NAME`: the samples whose kept fields match EXPR, a small safe
  language (`lang == "en" and year >= 2020`, `source in ['web', 'books']`, `not (x < 0.5)`;
  see `croupier.shards.scoring.where`);
- `--within SEL`: the cut chooses only among an earlier selection's samples.

A filter and a cut in one command apply in that order; `--within` chains more (a filter,
then a quality cut, then density). With `--per-cluster` a fraction is kept inside every
cluster. Several selections coexist under different names; rewriting a name bumps its
`version` in the manifest (and changes its layout fingerprint, so sampler states made on the
old subset are refused). `croupier serve --selection NAME` / `croupier simulate --selection
NAME` then sample only inside it (`Sidecar.layout(selection=NAME)`). The selection itself is
`croupier.shards.scoring.subset.select_subset`.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from croupier.shards.scoring.select import SELECTORS
from croupier.shards.scoring.subset import select_subset


def run(args: argparse.Namespace) -> int:
    from croupier.format.sidecar import Sidecar

    sidecar = Sidecar.open(args.dir)
    name, ids, params = select_subset(sidecar, args.by, args.keep, per_cluster=args.per_cluster,
                                      scores=args.scores, name=args.name, seed=args.seed, threshold=args.threshold,
                                      where=args.where, within=args.within)
    labels = np.asarray(sidecar.assignments(), dtype=np.int64)[ids]
    clusters = int(len(np.unique(labels[labels >= 0])))
    how = []
    if args.where is not None:
        how.append(f"where {args.where}")
    if args.within is not None:
        how.append(f"within {args.within!r}")
    if args.by is not None:
        cut = f"keep {args.keep:g}" if args.keep is not None else f"threshold {args.threshold:g}"
        how.append(f"by {args.by} ({cut}{' per cluster' if args.per_cluster else ''})")
    print(f"selection {name!r} (version {params['version']}): kept {len(ids):,} of "
          f"{sidecar.num_samples:,} samples ({100.0 * len(ids) / sidecar.num_samples:.1f}%) "
          f"{', '.join(how)}; {clusters} of {sidecar.num_clusters} clusters non-empty")
    return 0


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep must be a number in (0, 1], got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"threshold must be a number, got {text!r}") from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "select", help="keep samples by a score or a filter (named subset in the sidecar)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="MDS dataset folder with a croupier sidecar")
    p.add_argument("--by", default=None, metavar="SELECTOR_OR_SCORE",
                   help=f"one of: {', '.join(SELECTORS)}, or a score column stored with --from-field/--from-file")
    p.add_argument("--keep", default=None, type=_fraction, help="fraction to keep, in (0, 1]")
    p.add_argument("--threshold", default=None, type=_number,
                   help="keep every sample whose score is at least this good (instead of --keep)")
    p.add_argument("--where", default=None, metavar="EXPR",
                   help="keep only samples whose kept fields match EXPR (==, !=, <, <=, >, >=, in [..], and, or, "
                        "not, parentheses, numbers, quoted strings)")
    p.add_argument("--within", default=None, metavar="SELECTION",
                   help="choose only among the samples of an earlier selection")
    p.add_argument("--per-cluster", action="store_true", help="keep the fraction inside every cluster")
    p.add_argument("--scores", help="score column of a built-in selector (default: the selector's name)")
    p.add_argument("--name", help="selection name (default: BY-KEEP[-per-cluster]; required with --where alone)")
    p.add_argument("--seed", type=int, default=0, help="seed for density and random (default 0)")
    p.set_defaults(func=run)


__all__ = ["register", "run"]
