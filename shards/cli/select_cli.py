"""`croupier shards select DIR --by askllm|density|perplexity|random --keep F [--per-cluster]`.

Turns a score column into a named subset stored in the sidecar (`Sidecar.write_selection`):
Ask-LLM keeps the top-k, perplexity the lowest-k, density k by inverse propensity
(probability proportional to 1/density, without replacement), random k uniformly. With
`--per-cluster` the fraction is kept inside every cluster. Several selections coexist
under different names; rewriting a name bumps its `version` in the manifest (and changes
its layout fingerprint, so sampler states made on the old subset are refused).
`croupier serve --selection NAME` / `croupier simulate --selection NAME` then sample only
inside it (`Sidecar.layout(selection=NAME)`).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.shards.scoring.select import SELECTORS, check_selector, keep_count, select


def default_name(by: str, keep: float, per_cluster: bool) -> str:
    return f"{by}-{keep:g}" + ("-per-cluster" if per_cluster else "")


def select_subset(sidecar: Any, by: str, keep: float, *, per_cluster: bool = False,
                  scores: str | None = None, name: str | None = None, seed: int = 0
                  ) -> tuple[str, np.ndarray, dict]:
    """Select and store a subset; returns (name, sorted ids, params written to the manifest)."""
    from croupier.format.sidecar import validate_name

    check_selector(by)
    n = sidecar.num_samples
    k = keep_count(n, keep)
    name = validate_name("selection", name or default_name(by, keep, per_cluster))
    values = None
    score_name = None
    score_params: dict | None = None
    if by != "random":
        score_name = scores or by
        if score_name not in sidecar.score_names():
            sidecar.reload()
        if score_name not in sidecar.score_names():
            have = ", ".join(sidecar.score_names()) or "none"
            raise ConfigError(f"selection by {by!r} needs the score column {score_name!r}, which this "
                              f"sidecar lacks (it has: {have}); run `croupier shards score "
                              f"{sidecar.root} --by {by}` first")
        values = np.asarray(sidecar.scores(score_name), dtype=np.float32)
        score_params = sidecar.score_params(score_name)
        if by != "density" and score_params.get("scorer") not in (None, by):
            raise ConfigError(f"score column {score_name!r} was made by {score_params.get('scorer')!r}, "
                              f"not {by!r}")
    labels = np.asarray(sidecar.assignments(), dtype=np.int64) if per_cluster else None
    ids = select(by, keep, scores=values, n=n, labels=labels, seed=seed)
    version = 1
    if name in sidecar.selection_names():
        version = int(sidecar.selection_params(name).get("version", 0)) + 1
    params = {"by": by, "keep": float(keep), "k": int(len(ids)), "per_cluster": bool(per_cluster),
              "seed": int(seed), "scores": score_name, "score_params": score_params,
              "num_samples": int(n), "version": version,
              "rule": {"askllm": "top-k score", "perplexity": "lowest-k score",
                       "density": "k without replacement, p ~ 1/density (Efraimidis-Spirakis)",
                       "random": "uniform k without replacement"}[by]}
    if len(ids) != k:  # per-cluster allocation sums to k by construction
        raise ConfigError(f"internal: selected {len(ids)} ids, expected {k}")
    sidecar.write_selection(name, ids, params)
    return name, ids, params


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


__all__ = ["select_subset", "default_name", "register", "run"]
