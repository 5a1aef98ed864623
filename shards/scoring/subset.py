"""A selection stored in the sidecar: a score column turned into a named, versioned subset.

`select_subset` reads the score column a selector needs, selects with the pure functions of
`croupier.shards.scoring.select`, and stores the ids with their parameters in the sidecar
(`Sidecar.write_selection`). Rewriting a name bumps its `version` (and changes its layout
fingerprint, so sampler states made on the old subset are refused).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.shards.scoring.select import check_selector, keep_count, select

RULES = {"askllm": "top-k score", "perplexity": "lowest-k score",
         "density": "k without replacement, p ~ 1/density (Efraimidis-Spirakis)",
         "random": "uniform k without replacement"}
"""What each selector keeps, as the manifest records it."""


def default_name(by: str, keep: float, per_cluster: bool) -> str:
    """A selection's name when none is given: BY-KEEP[-per-cluster]."""
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
              "num_samples": int(n), "version": version, "rule": RULES[by]}
    if len(ids) != k:  # per-cluster allocation sums to k by construction
        raise ConfigError(f"internal: selected {len(ids)} ids, expected {k}")
    sidecar.write_selection(name, ids, params)
    return name, ids, params
