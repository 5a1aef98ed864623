"""`croupier shards select DIR --by askllm|density|perplexity|random --keep F [--per-cluster]`.

Turns a score column into a named subset stored in the sidecar (`Sidecar.write_selection`):
Ask-LLM keeps the top-k, perplexity the lowest-k, density k by inverse propensity
(probability proportional to 1/density, without replacement), random k uniformly. With
`--per-cluster` the fraction is kept inside every cluster. Several selections coexist
under different names; rewriting a name bumps its `version` in the manifest (and changes
its layout fingerprint, so sampler states made on the old subset are refused).
`croupier serve --selection NAME` / `croupier simulate --selection NAME` then sample only
inside it (`Sidecar.layout(selection=NAME)`). The selection itself is
`croupier.shards.scoring.subset.select_subset`.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from croupier.shards.scoring.select import SELECTORS, check_selector
from croupier.shards.scoring.subset import select_subset


def run(args: argparse.Namespace) -> int:
    from croupier.format.sidecar import Sidecar

    check_selector(args.by)
    sidecar = Sidecar.open(args.dir)
    name, ids, params = select_subset(sidecar, args.by, args.keep, per_cluster=args.per_cluster,
                                      scores=args.scores, name=args.name, seed=args.seed)
    labels = np.asarray(sidecar.assignments(), dtype=np.int64)[ids]
    clusters = int(len(np.unique(labels[labels >= 0])))
    print(f"selection {name!r} (version {params['version']}): kept {len(ids):,} of "
          f"{sidecar.num_samples:,} samples ({100.0 * len(ids) / sidecar.num_samples:.1f}%) by "
          f"{args.by}{' per cluster' if args.per_cluster else ''}; {clusters} of "
          f"{sidecar.num_clusters} clusters non-empty")
    return 0


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"keep must be a number in (0, 1], got {text!r}") from None


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "select", help="keep a fraction of the samples by a score (named subset in the sidecar)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="MDS dataset folder with a croupier sidecar")
    p.add_argument("--by", required=True, metavar="SELECTOR", help=f"one of: {', '.join(SELECTORS)}")
    p.add_argument("--keep", required=True, type=_fraction, help="fraction to keep, in (0, 1]")
    p.add_argument("--per-cluster", action="store_true", help="keep the fraction inside every cluster")
    p.add_argument("--scores", help="score column to use (default: the selector's name)")
    p.add_argument("--name", help="selection name (default: BY-KEEP[-per-cluster])")
    p.add_argument("--seed", type=int, default=0, help="seed for density and random (default 0)")
    p.set_defaults(func=run)


__all__ = ["register", "run"]
