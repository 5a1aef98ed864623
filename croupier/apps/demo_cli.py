"""`croupier demo`: build, serve, train on 2 ranks, kill and resume the server, report.

    croupier demo                         # built-in long-tailed corpus, ~2-4 minutes on 2 cores
    croupier demo --corpus my.jsonl       # your own JSON lines (field "text")
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from croupier.apps.demo import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo", help="the whole path on one machine: build, serve, 2-rank training with a server kill, report",
        description="Builds shards and clusters for a corpus, starts the sampler server, trains a tiny LM "
                    "on 2 torchrun ranks with clusterclip, SIGKILLs and restarts the server halfway to show "
                    "exact resume, and ends with a per-cluster table and PNGs.")
    p.add_argument("--out", default=str(d.out), help=f"output folder (default: {d.out}/; replaced if it is a demo folder)")
    p.add_argument("--corpus", default=None, help="your own JSON lines (or Parquet / .txt folder) instead of the built-in corpus")
    p.add_argument("--text-field", default=d.text_field, help="field holding the text (default: text)")
    p.add_argument("--docs", type=int, default=d.docs, help=f"built-in corpus: documents (default {d.docs})")
    p.add_argument("--topics", type=int, default=d.topics, help=f"built-in corpus: topics (default {d.topics})")
    p.add_argument("--clusters", type=int, default=None,
                   help="k-means clusters (default: the topic count, or about sqrt(N) for --corpus)")
    p.add_argument("--embedder", default=d.embedder, choices=("minilm", "hashing"),
                   help="document embedder (default minilm: all-MiniLM-L6-v2, offline; hashing: model-free, for large corpora on CPU)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"training steps (default {d.steps})")
    p.add_argument("--global-batch", type=int, default=d.global_batch, help=f"samples per step over both ranks (default {d.global_batch})")
    p.add_argument("--world", type=int, default=d.world, help="torchrun ranks (default 2)")
    p.add_argument("--policy", default=d.policy, choices=("random", "uniform", "clusterclip", "g2s", "s2g"),
                   help="sampling policy (default clusterclip; g2s/s2g switch halfway)")
    p.add_argument("--clip", default=d.clip, help="clip threshold: integer or auto (default auto)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="print only the final summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from croupier.apps.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=Path(args.out), corpus=Path(args.corpus) if args.corpus else None, text_field=args.text_field,
                     docs=args.docs, topics=args.topics, clusters=args.clusters, embedder=args.embedder,
                     steps=args.steps, global_batch=args.global_batch, world=args.world, policy=args.policy,
                     clip=args.clip if args.policy in ("clusterclip", "weighted") else "", seed=args.seed,
                     verbose=not args.quiet)
    result = run_demo(cfg)
    if args.quiet:
        print(result.table)
        print(f"outputs: {result.out} (report: {result.report_dir}/index.html)")
    return 0 if result.resume_exact else 1
