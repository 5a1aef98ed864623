"""`croupier shards inspect DIR` and `croupier shards plot DIR --out clusters.png`.

Inspect prints the sidecar manifest and the cluster-size distribution (largest, smallest,
quantiles), with `--examples N` a few texts from each of the largest and smallest
clusters. Plot draws the sorted cluster sizes on a log scale: the picture to look at
before choosing a clip threshold.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from croupier.errors import ConfigError

QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print the sidecar manifest and cluster-size distribution",
                       description="Print the cluster sidecar's manifest and cluster-size distribution.")
    p.add_argument("dataset", metavar="DIR", help="dataset folder (index.json + croupier/ sidecar)")
    p.add_argument("--examples", type=int, default=0, metavar="N", help="show N texts per cluster")
    p.add_argument("--clusters", type=int, default=5, metavar="M",
                   help="with --examples: how many of the largest and of the smallest clusters (default 5)")
    p.add_argument("--by", default=None, metavar="FIELD",
                   help="how the groups of a metadata field (the --group-by field, or a kept column) spread over "
                        "the clusters: NMI, per-group purity, groups drowned in bigger clusters")
    p.add_argument("--drown", type=float, default=0.10, metavar="X",
                   help="with --by: a group below this share of its main cluster is drowned (default 0.10)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_inspect)

    q = sub.add_parser("plot", help="PNG of sorted cluster sizes (log scale)",
                       description="Plot the sorted cluster sizes on a log scale.")
    q.add_argument("dataset", metavar="DIR", help="dataset folder")
    q.add_argument("--out", required=True, help="PNG file to write")
    q.set_defaults(func=run_plot)


def size_summary(sizes: np.ndarray) -> dict[str, Any]:
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


def _member_ids(side: Any, c: int, n: int) -> np.ndarray:
    offsets = side.offsets()
    lo, hi = int(offsets[c]), int(offsets[c + 1])
    members = side.members()
    if members is None:
        ids = np.arange(lo, hi)
    else:
        ids = np.asarray(members[lo:hi])
    return ids[np.linspace(0, len(ids) - 1, min(n, len(ids))).round().astype(np.int64)] if len(ids) else ids


def run_inspect(args: argparse.Namespace) -> int:
    from croupier.format.sidecar import Sidecar

    if args.examples < 0 or args.clusters < 1:
        raise ConfigError(f"--examples must be >= 0 and --clusters >= 1, got {args.examples}, {args.clusters}")
    side = Sidecar.open(args.dataset)
    m = side.manifest
    sizes = side.sizes
    summary = {
        "dataset": args.dataset,
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
        "selections": {k: v.get("count") for k, v in m.get("selections", {}).items()},
        "sizes": size_summary(sizes),
    }
    from croupier.shards.diagnostics import format_report, size_stats
    from croupier.shards.build.grouping import read_grouping

    summary["sizes"].update(size_stats(sizes))
    grouping = read_grouping(side)
    if grouping is not None:
        summary["grouping"] = {"field": grouping.field, "groups": len(grouping.names), "rule": grouping.rule()}
    tokens = token_summary(side)
    if tokens is not None:
        summary["tokens"] = tokens
    report = long_tail(side, args.dataset, args.by, args.drown, grouping) if args.by else None
    if report is not None:
        summary["by"] = report.to_dict()
    examples: dict[int, list[str]] = {}
    if args.examples:
        from croupier.shards.build.mds import MDSSource

        order = np.argsort(-sizes, kind="stable")
        picks = list(dict.fromkeys([*order[:args.clusters].tolist(), *order[::-1][:args.clusters].tolist()]))
        with MDSSource(side.remote or args.dataset) as src:
            field = m.get("text_field", "text")
            for c in picks:
                examples[int(c)] = [str(t) for t in src.get(_member_ids(side, int(c), args.examples), field)]
    if args.json:
        summary["examples"] = {str(k): v for k, v in examples.items()}
        summary["manifest"] = {k: v for k, v in m.items() if k != "sizes"}
        print(json.dumps(summary, indent=1, default=str))
        return 0
    s = summary["sizes"]
    print(f"dataset      {args.dataset}")
    print(f"fingerprint  {summary['fingerprint']}")
    print(f"sidecar      {summary['format']}, layout {summary['layout']}")
    print(f"samples      {summary['samples']}")
    print(f"clusters     {summary['clusters']} (requested {m.get('requested_clusters', '?')})")
    emb = summary["embedder"] or {}
    print(f"embedder     {emb.get('name')} (dim {emb.get('dim')}), metric {summary['metric']}, seed {summary['seed']}")
    if summary["remote"]:
        print(f"shards at    {summary['remote']}")
    print(f"scores       {', '.join(summary['scores']) or 'none'}")
    print(f"selections   {', '.join(f'{k} ({v})' for k, v in summary['selections'].items()) or 'none'}")
    print(f"sizes        largest {s['largest']} ({s['largest_share']:.1%} of samples), smallest {s['smallest']}, "
          f"mean {s['mean']:.1f}, largest/smallest {s['max_over_min']:.1f}")
    print("quantiles    " + "  ".join(f"{k} {v:g}" for k, v in s["quantiles"].items()))
    print(f"spread       min {s['min']}, median {s['median']:g}, max {s['max']}, Gini {s['gini']:.3f}")
    if tokens is not None:
        t = tokens["per_cluster"]
        print(f"tokens       {tokens['total']} ({tokens['per_sample_mean']:.1f} per sample; tokenizer "
              f"{tokens['tokenizer']}, from the {tokens['from']} {tokens['field']!r})")
        print(f"per cluster  mean {t['mean']:.1f}, min {t['min']}, max {t['max']} tokens")
    else:
        print("tokens       not counted (`croupier shards tokens` adds them)")
    if grouping is not None:
        print(f"grouped by   {grouping.field!r}: {len(grouping.names)} groups, {grouping.rule()}")
    if report is not None:
        for line in format_report(report):
            print(line)
    for c, texts in examples.items():
        print(f"\ncluster {c} ({int(sizes[c])} samples):")
        for t in texts:
            t = " ".join(t.split())
            print(f"  - {t[:160]}{'...' if len(t) > 160 else ''}")
    return 0


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


def long_tail(side: Any, dataset: str, field: str, drown: float, grouping: Any) -> Any:
    """The diagnostics of `field`: the `--group-by` field or a kept MDS column (`tail_check.field_codes`)."""
    from croupier.shards.diagnostics import long_tail_report

    clusters = np.asarray(side.assignments())
    columns = side.manifest.get("columns") or {}
    grouped = grouping is not None and grouping.field == field
    if not grouped and (field not in columns or field == side.manifest.get("text_field")):
        kept = ", ".join(c for c in columns if c != side.manifest.get("text_field")) or "none"
        raise ConfigError(f"--by {field!r}: the dataset keeps no such metadata field (kept columns: {kept}); "
                          "build with --keep-fields FIELD or --group-by FIELD")
    from croupier.shards.tail_check import field_codes

    got = field_codes(side, dataset, field)
    assert got is not None  # no group limit given
    return long_tail_report(clusters, got[0], got[1], field, drown)


def run_plot(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from croupier.format.sidecar import Sidecar

    side = Sidecar.open(args.dataset)
    sizes = np.sort(side.sizes)[::-1]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ranks = np.arange(1, len(sizes) + 1)
    ax.fill_between(ranks, sizes, step="mid", alpha=0.35)
    ax.step(ranks, sizes, where="mid", lw=1.2, label="cluster size")
    ax.set_yscale("log")
    ax.set_xlabel("cluster rank (largest first)")
    ax.set_ylabel("samples (log scale)")
    med = float(np.median(sizes))
    ax.axhline(med, color="gray", ls="--", lw=1, label=f"median {med:g}")
    ax.set_title(f"{side.num_clusters} clusters, {side.num_samples} samples "
                 f"(largest {int(sizes[0])}, smallest {int(sizes[-1])})")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(args.out, format="png")
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0
