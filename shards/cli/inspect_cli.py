"""`croupier shards inspect DIR` and `croupier shards plot DIR --out clusters.png`.

Inspect prints the sidecar manifest, where the embeddings, clusters and scores came from
(file and hash, field, embedder), every score's quantiles, and the cluster-size distribution
(largest, smallest, quantiles), with `--examples N` a few texts from each of the largest and smallest
clusters (`croupier.shards.summary`). Plot draws the sorted cluster sizes on a log scale
(`croupier.shards.plot`): the picture to look at before choosing a clip threshold; with
`--score NAME` the histogram of a score column instead (before choosing a --keep or --threshold).
"""

from __future__ import annotations

import argparse
import json


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
    q.add_argument("--score", default=None, metavar="NAME",
                   help="draw the histogram of a score column instead of the cluster sizes")
    q.set_defaults(func=run_plot)


def run_inspect(args: argparse.Namespace) -> int:
    from croupier.shards.diagnostics import format_report
    from croupier.shards.summary import summarize

    got = summarize(args.dataset, by=args.by, drown=args.drown, examples=args.examples, clusters=args.clusters)
    summary, m = got.summary, got.manifest
    if args.json:
        summary["examples"] = {str(k): v for k, v in got.examples.items()}
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
    from croupier.shards.summary import describe_provenance

    emb_from, clusters_from = describe_provenance(summary["provenance"])
    print(f"embeddings   {emb_from}")
    print(f"clusters by  {clusters_from}")
    print(f"scores       {', '.join(summary['scores']) or 'none'}")
    for name, st in summary["score_stats"].items():
        q = st["quantiles"]
        print(f"  {name:<10} {st['source']}: " + "  ".join(f"{k} {v:.4g}" for k, v in q.items())
              + f"  mean {st['mean']:.4g}")
    print(f"selections   {', '.join(f'{k} ({v})' for k, v in summary['selections'].items()) or 'none'}")
    print(f"sizes        largest {s['largest']} ({s['largest_share']:.1%} of samples), smallest {s['smallest']}, "
          f"mean {s['mean']:.1f}, largest/smallest {s['max_over_min']:.1f}")
    print("quantiles    " + "  ".join(f"{k} {v:g}" for k, v in s["quantiles"].items()))
    print(f"spread       min {s['min']}, median {s['median']:g}, max {s['max']}, Gini {s['gini']:.3f}")
    tokens = got.tokens
    if tokens is not None:
        t = tokens["per_cluster"]
        print(f"tokens       {tokens['total']} ({tokens['per_sample_mean']:.1f} per sample; tokenizer "
              f"{tokens['tokenizer']}, from the {tokens['from']} {tokens['field']!r})")
        print(f"per cluster  mean {t['mean']:.1f}, min {t['min']}, max {t['max']} tokens")
    else:
        print("tokens       not counted (`croupier shards tokens` adds them)")
    if got.grouping is not None:
        print(f"grouped by   {got.grouping.field!r}: {len(got.grouping.names)} groups, {got.grouping.rule()}")
    if got.report is not None:
        for line in format_report(got.report):
            print(line)
    for c, texts in got.examples.items():
        print(f"\ncluster {c} ({int(got.sizes[c])} samples):")
        for t in texts:
            t = " ".join(t.split())
            print(f"  - {t[:160]}{'...' if len(t) > 160 else ''}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from croupier.shards.plot import plot_cluster_sizes, plot_score_histogram

    if args.score is not None:
        plot_score_histogram(args.dataset, args.score, args.out)
    else:
        plot_cluster_sizes(args.dataset, args.out)
    print(f"wrote {args.out}")
    return 0
