"""A selection stored in the sidecar: filters and score cuts turned into a named, versioned subset.

`select_subset` composes, in this order, what a `croupier shards select` asks for:

1. the candidates: every sample, or those of an earlier selection (`within`), or those whose
   kept fields match a `--where` expression (`croupier.shards.scoring.where`), or both;
2. a cut by a score among the candidates: a built-in selector (askllm, density, perplexity,
   random; `croupier.shards.scoring.select`) or any score column that records its direction
   (`higher_is_better`, as `croupier shards score --from-field` stores it), keeping a fraction
   (`keep`, globally or per cluster) or every sample at least as good as a `threshold`;

and stores the ids with their parameters in the sidecar (`Sidecar.write_selection`). A filter
alone (no score) is a selection too. So a filter, then a quality cut, then density is three
commands, each `--within` the last. Rewriting a name bumps its `version` (and changes its
layout fingerprint, so sampler states made on the old subset are refused).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from croupier.errors import ConfigError
from croupier.shards.scoring.select import (
    SELECTORS,
    at_threshold,
    check_selector,
    keep_count,
    priorities,
    top_fraction,
)

RULES = {"askllm": "top-k score", "perplexity": "lowest-k score",
         "density": "k without replacement, p ~ 1/density (Efraimidis-Spirakis)",
         "random": "uniform k without replacement"}
"""What each selector keeps, as the manifest records it."""
DIRECTION = {"askllm": True, "perplexity": False}
"""Built-in scores that a --threshold can cut: whether higher is better."""


def default_name(by: str, keep: float, per_cluster: bool) -> str:
    """A selection's name when none is given: BY-KEEP[-per-cluster]."""
    return f"{by}-{keep:g}" + ("-per-cluster" if per_cluster else "")


def _candidates(sidecar: Any, where: str | None, within: str | None) -> np.ndarray | None:
    """Sorted ids of the samples a cut chooses among (None: every sample)."""
    ids = None
    if within is not None:
        ids = np.asarray(sidecar.selection(within), dtype=np.int64)
    if where is not None:
        from croupier.shards.scoring.external import kept_fields, read_column
        from croupier.shards.scoring.where import matching_ids

        fields = kept_fields(sidecar)
        match = matching_ids(where, lambda f: read_column(sidecar, f), fields, sidecar.num_samples)
        ids = match if ids is None else np.intersect1d(ids, match)
    return ids


def _score_column(sidecar: Any, by: str, scores: str | None) -> tuple[str, np.ndarray, dict, bool | None]:
    """(column name, values, its params, higher_is_better or None) of the score a cut reads."""
    builtin = by in SELECTORS
    name = (scores or by) if builtin else by
    if scores is not None and not builtin:
        raise ConfigError(f"--scores names the column of a built-in selector; --by {by!r} is a score column itself")
    if name not in sidecar.score_names():
        sidecar.reload()
    if name not in sidecar.score_names():
        have = ", ".join(sidecar.score_names()) or "none"
        if not builtin:
            raise ConfigError(f"unknown selector {by!r}; valid: {', '.join(SELECTORS)}, or a score column of "
                              f"this sidecar (it has: {have}; store one with `croupier shards score "
                              f"{sidecar.root} --from-field FIELD`)")
        raise ConfigError(f"selection by {by!r} needs the score column {name!r}, which this "
                          f"sidecar lacks (it has: {have}); run `croupier shards score "
                          f"{sidecar.root} --by {by}` first")
    params = sidecar.score_params(name)
    if builtin:
        if by != "density" and params.get("scorer") not in (None, by):
            raise ConfigError(f"score column {name!r} was made by {params.get('scorer')!r}, not {by!r}")
        return name, np.asarray(sidecar.scores(name), dtype=np.float32), params, DIRECTION.get(by)
    if "higher_is_better" not in params:
        raise ConfigError(f"score column {by!r} (made by {params.get('scorer')!r}) does not record which way is "
                          f"better: select it with --by {params.get('scorer')} --scores {by}")
    return name, np.asarray(sidecar.scores(name), dtype=np.float32), params, bool(params["higher_is_better"])


def select_subset(sidecar: Any, by: str | None, keep: float | None, *, per_cluster: bool = False,
                  scores: str | None = None, name: str | None = None, seed: int = 0, threshold: float | None = None,
                  where: str | None = None, within: str | None = None) -> tuple[str, np.ndarray, dict]:
    """Select and store a subset; returns (name, sorted ids, params written to the manifest)."""
    from croupier.format.sidecar import validate_name

    n = sidecar.num_samples
    if by is None:
        if where is None and within is None:
            raise ConfigError("give --by SELECTOR_OR_SCORE with --keep/--threshold, or a --where filter")
        if keep is not None or threshold is not None or per_cluster:
            raise ConfigError("--keep, --threshold and --per-cluster cut by a score: give --by with them")
    else:
        if by in SELECTORS:
            check_selector(by)
        if (keep is None) == (threshold is None):
            raise ConfigError(f"--by {by} needs one of --keep FRACTION or --threshold VALUE")
        if threshold is not None and per_cluster:
            raise ConfigError("--per-cluster applies to --keep: a --threshold is the same in every cluster")
        if keep is not None:
            keep_count(n, keep)  # refuses a fraction outside (0, 1] before any reading
    if name is None:
        if by is None:
            raise ConfigError("a --where filter needs --name NAME for its selection")
        name = default_name(by, keep, per_cluster) if keep is not None else f"{by}-at-{threshold:g}"
    name = validate_name("selection", name)
    if within is not None and within == name:
        raise ConfigError(f"--within {within!r} and --name {name!r}: a selection cannot replace the one it is cut from")
    candidates = _candidates(sidecar, where, within)
    if candidates is not None and len(candidates) == 0:
        raise ConfigError(f"no sample matches {_describe(where, within)}: the selection would be empty")
    score_name, score_params, higher = None, None, None
    if by is None:
        ids = candidates
        rule = "filter"
    elif by == "random" and threshold is None:
        labels = np.asarray(sidecar.assignments(), dtype=np.int64) if per_cluster else None
        ids = top_fraction(priorities("random", None, n, seed), float(keep), labels=labels,  # type: ignore[arg-type]
                           candidates=candidates)
        rule = RULES["random"]
    else:
        if by == "random":
            raise ConfigError("--threshold cuts a score; random has none: use --keep")
        score_name, values, score_params, higher = _score_column(sidecar, by, scores)
        if threshold is not None:
            if higher is None:
                raise ConfigError(f"--threshold cuts a score with a direction; {by} keeps by inverse propensity: "
                                  "use --keep")
            ids = at_threshold(values, float(threshold), higher, candidates)
            if len(ids) == 0:
                raise ConfigError(f"no sample of score {score_name!r} is {'>=' if higher else '<='} {threshold:g} "
                                  f"(range [{float(values.min()):g}, {float(values.max()):g}]): the selection "
                                  "would be empty")
            rule = f"score {'>=' if higher else '<='} threshold"
        else:
            labels = np.asarray(sidecar.assignments(), dtype=np.int64) if per_cluster else None
            if by in SELECTORS:
                pri = priorities(by, values, n, seed)
                rule = RULES[by]
            else:
                pri = values.astype(np.float64) if higher else -values.astype(np.float64)
                rule = "top-k score" if higher else "lowest-k score"
            ids = top_fraction(pri, float(keep), labels=labels, candidates=candidates)  # type: ignore[arg-type]
    assert ids is not None
    version = 1
    if name in sidecar.selection_names():
        version = int(sidecar.selection_params(name).get("version", 0)) + 1
    params = {"by": by, "keep": None if keep is None else float(keep), "threshold": threshold,
              "higher_is_better": higher, "k": int(len(ids)), "per_cluster": bool(per_cluster), "seed": int(seed),
              "scores": score_name, "score_params": score_params, "where": where, "within": within,
              "candidates": None if candidates is None else int(len(candidates)),
              "num_samples": int(n), "version": version, "rule": rule}
    if keep is not None:
        expected = keep_count(n if candidates is None else len(candidates), keep)
        if len(ids) != expected:  # per-cluster allocation sums to k by construction
            raise ConfigError(f"internal: selected {len(ids)} ids, expected {expected}")
    sidecar.write_selection(name, ids, params)
    return name, ids, params


def _describe(where: str | None, within: str | None) -> str:
    parts = ([f"--where {where!r}"] if where is not None else []) + \
        ([f"--within {within!r}"] if within is not None else [])
    return " and ".join(parts)
