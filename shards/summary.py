"""What `croupier shards inspect` reports about a built dataset, as data.

`summarize(dataset, ...)` reads the sidecar and gathers the manifest's essentials, the
cluster-size distribution (largest, smallest, quantiles, Gini), the grouping, the token
counts per cluster, with `by=FIELD` how the field's groups spread over the clusters
(`croupier.shards.diagnostics`), and with `examples=N` a few texts from each of the largest
and smallest clusters. The command prints it as text or JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from croupier.errors import ConfigError, DatasetError
from croupier.shards.diagnostics import DEFAULT_DROWN, LongTailReport

QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


@dataclass
class DatasetSummary:
    """A dataset's summary (`summary`: JSON-ready) and the objects behind it."""

    summary: dict[str, Any]
    manifest: dict[str, Any]
    sizes: np.ndarray
    grouping: Any = None
    """The sidecar's `SidecarGrouping`, or None for a build without --group-by."""
    tokens: dict[str, Any] | None = None
    report: LongTailReport | None = None
    examples: dict[int, list[str]] = field(default_factory=dict)
    """Cluster -> a few of its texts (with `examples=N`)."""


def size_summary(sizes: np.ndarray) -> dict[str, Any]:
    """Cluster sizes: count, total, largest, smallest, mean, shares and quantiles."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return {
        "clusters": int(len(sizes)),
        "samples": int(sizes.sum()),
        "largest": int(sizes.max()),
        "smallest": int(sizes.min()),
        "mean": float(sizes.mean()),
        "largest_share": float(sizes.max() / sizes.sum()),
        "max_over_min": float(sizes.max() / sizes.min()),
        "quantiles": {f"p{round(q * 100)}": float(np.quantile(sizes, q)) for q in QUANTILES},
    }


def token_summary(side: Any) -> dict[str, Any] | None:
    """Total tokens and tokens per cluster (mean/min/max), when the sidecar has token counts."""
    counts = side.token_counts()
    if counts is None:
        return None
    per_cluster = np.bincount(np.asarray(side.assignments(), dtype=np.int64), weights=np.asarray(counts, np.float64),
                              minlength=side.num_clusters).astype(np.int64)
    params = side.token_counts_params() or {}
    total = int(np.asarray(counts, dtype=np.int64).sum())
    return {"total": total, "per_sample_mean": total / max(1, len(counts)), "tokenizer": params.get("tokenizer"),
            "field": params.get("field"), "from": params.get("from"),
            "per_cluster": {"mean": float(per_cluster.mean()), "min": int(per_cluster.min()),
                            "max": int(per_cluster.max())}}


def field_report(side: Any, dataset: str, field_name: str, drown: float, grouping: Any) -> LongTailReport:
    """The diagnostics of a field: the `--group-by` field or a kept MDS column (`tail_check.field_codes`)."""
    from croupier.shards.diagnostics import long_tail_report
    from croupier.shards.tail_check import field_codes

    clusters = np.asarray(side.assignments())
    columns = side.manifest.get("columns") or {}
    grouped = grouping is not None and grouping.field == field_name
    if not grouped and (field_name not in columns or field_name == side.manifest.get("text_field")):
        kept = ", ".join(c for c in columns if c != side.manifest.get("text_field")) or "none"
        raise ConfigError(f"--by {field_name!r}: the dataset keeps no such metadata field (kept columns: {kept}); "
                          "build with --keep-fields FIELD or --group-by FIELD")
    got = field_codes(side, dataset, field_name)
    if got is None:  # only with a limit on the groups, and none is given
        raise DatasetError(f"--by {field_name!r}: the field's groups could not be read")
    return long_tail_report(clusters, got[0], got[1], field_name, drown)


def member_sample(side: Any, cluster: int, n: int) -> np.ndarray:
    """Up to `n` sample ids of `cluster`, evenly spread over its members."""
    offsets = side.offsets()
    lo, hi = int(offsets[cluster]), int(offsets[cluster + 1])
    members = side.members()
    ids = np.arange(lo, hi) if members is None else np.asarray(members[lo:hi])
    return ids[np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(np.int64)] if len(ids) else ids


def cluster_examples(side: Any, dataset: str, clusters: int, per_cluster: int) -> dict[int, list[str]]:
    """Texts of `per_cluster` members of each of the `clusters` largest and smallest clusters."""
    from croupier.shards.build.mds import MDSSource

    sizes = side.sizes
    order = np.argsort(-sizes, kind="stable")
    picks = list(dict.fromkeys([*order[:clusters].tolist(), *order[::-1][:clusters].tolist()]))
    out: dict[int, list[str]] = {}
    with MDSSource(side.remote or dataset) as src:
        text_field = side.manifest.get("text_field", "text")
        for c in picks:
            out[int(c)] = [str(t) for t in src.get(member_sample(side, int(c), per_cluster), text_field)]
    return out


SCORE_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def score_summary(side: Any) -> dict[str, dict[str, Any]]:
    """Every score column's distribution (quantiles, mean) and where it came from."""
    out: dict[str, dict[str, Any]] = {}
    for name in side.score_names():
        values = np.asarray(side.scores(name), dtype=np.float64)
        params = side.score_params(name)
        q = np.quantile(values, SCORE_QUANTILES) if len(values) else np.zeros(len(SCORE_QUANTILES))
        labels = ["min", "q10", "q25", "median", "q75", "q90", "max"]
        out[name] = {"quantiles": {k: float(v) for k, v in zip(labels, q)}, "mean": float(values.mean()),
                     "source": score_source(params), "higher_is_better": params.get("higher_is_better")}
    return out


def score_source(params: dict[str, Any]) -> str:
    """Where a score column came from, in words."""
    scorer = params.get("scorer")
    if scorer == "external":
        if params.get("from") == "field":
            src = f"field {params.get('field')!r}"
        else:
            src = f"file {params.get('file')} (sha256 {str(params.get('sha256', ''))[:12]})"
        return f"{src}, {'higher' if params.get('higher_is_better', True) else 'lower'} is better"
    return f"scorer {scorer}"


def provenance(m: dict[str, Any]) -> dict[str, Any]:
    """Where the embeddings and clusters came from (a sidecar built before this was recorded: derived)."""
    if "provenance" in m:
        return dict(m["provenance"])
    emb = m.get("embedder") or {}
    grouping = m.get("grouping")
    clusters = ({"from": "field", "field": grouping.get("field")} if grouping else
                {"from": "k-means", "clusters": m.get("requested_clusters")})
    return {"embeddings": {"from": "embedder", "embedder": emb.get("name")}, "clusters": clusters}


def describe_provenance(prov: dict[str, Any]) -> tuple[str, str]:
    """(embeddings, clusters) provenance in words, for `croupier shards inspect`."""
    e, c = prov.get("embeddings", {}), prov.get("clusters", {})
    if e.get("from") == "file":
        extra = ", ".join(f"{k} {e[k]}" for k in ("column", "key", "dtype", "rows") if e.get(k) is not None)
        emb = f"given: file {e.get('file')} (sha256 {str(e.get('sha256', ''))[:12]}{', ' + extra if extra else ''})"
    elif e.get("from") == "field":
        emb = f"given: field {e.get('field')!r} of the records"
    elif e.get("from") == "none":
        emb = "none (--embedder none)"
    else:
        emb = f"embedder {e.get('embedder')}"
    if c.get("from") == "field":
        clu = f"the field {c.get('field')!r}, one cluster per value"
    elif c.get("from") == "field+k-means":
        clu = f"the field {c.get('field')!r}, k-means inside each value ({c.get('rule')})"
    else:
        clu = f"k-means over the embeddings (K = {c.get('clusters')})"
    return emb, clu


def summarize(dataset: str, *, by: str | None = None, drown: float = DEFAULT_DROWN, examples: int = 0,
              clusters: int = 5) -> DatasetSummary:
    """The summary of the dataset at `dataset` (see the module docstring)."""
    from croupier.format.sidecar import Sidecar
    from croupier.shards.build.grouping import read_grouping
    from croupier.shards.diagnostics import size_stats

    if examples < 0 or clusters < 1:
        raise ConfigError(f"--examples must be >= 0 and --clusters >= 1, got {examples}, {clusters}")
    side = Sidecar.open(dataset)
    m = side.manifest
    sizes = side.sizes
    summary: dict[str, Any] = {
        "dataset": dataset,
        "fingerprint": side.fingerprint,
        "format": f"{m['format']} v{m['version']}",
        "layout": m["layout"],
        "samples": side.num_samples,
        "clusters": side.num_clusters,
        "embedder": m.get("embedder"),
        "metric": m.get("metric"),
        "seed": m.get("seed"),
        "kmeans": m.get("kmeans"),
        "remote": m.get("remote"),
        "text_field": m.get("text_field"),
        "columns": m.get("columns"),
        "scores": {k: v.get("params") for k, v in m.get("scores", {}).items()},
        "score_stats": score_summary(side),
        "provenance": provenance(m),
        "selections": {k: v.get("count") for k, v in m.get("selections", {}).items()},
        "sizes": {**size_summary(sizes), **size_stats(sizes)},
    }
    grouping = read_grouping(side)
    if grouping is not None:
        summary["grouping"] = {"field": grouping.field, "groups": len(grouping.names), "rule": grouping.rule()}
    tokens = token_summary(side)
    if tokens is not None:
        summary["tokens"] = tokens
    report = field_report(side, dataset, by, drown, grouping) if by else None
    if report is not None:
        summary["by"] = report.to_dict()
    found = cluster_examples(side, dataset, clusters, examples) if examples else {}
    return DatasetSummary(summary=summary, manifest=m, sizes=sizes, grouping=grouping, tokens=tokens,
                          report=report, examples=found)
