"""`croupier report`: PNGs and an HTML page from a live server or a server's state directory.

    croupier report --server HOST:PORT --out report/ [--watch 10] [--token-file F] [--tls-ca PEM]
    croupier report --state-dir DIR [--dataset DATASET_DIR] --out report/
"""

from __future__ import annotations

import argparse

from croupier.client.cli.connection_args import add_connection_arguments, connection_from_args
from croupier.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="plot cluster sizes vs draws, passes vs the clip, draws over time, rank lag",
        description="Writes PNGs and index.html that show how the sampler spread its draws over the "
                    "clusters, to choose and defend a clip threshold.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", metavar="HOST:PORT", help="read counters from a live sampler server")
    src.add_argument("--state-dir", metavar="DIR", help="read the newest checkpoint of a server's state directory (a folder or s3://bucket/prefix)")
    p.add_argument("--out", default="report", help="output folder (default: report/)")
    p.add_argument("--dataset", default=None,
                   help="dataset folder with the cluster sidecar (default: the one the server or state names)")
    p.add_argument("--selection", default=None, help="selection the job draws from (state-dir mode)")
    p.add_argument("--mix", default=None, metavar="FILE",
                   help="a mixture job's file, to replay its draws per source (default: the one server.json names)")
    add_connection_arguments(p, server_required=False, token_flag=True)
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS",
                   help="with --server: sample rank progress for this long to plot the lag")
    p.add_argument("--no-replay", action="store_true",
                   help="skip recomputing draws over time by replaying the sampler")
    p.add_argument("--table", type=int, default=20, metavar="N",
                   help="print the N largest/smallest clusters (0: none)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from croupier.apps import report

    if args.watch < 0:
        raise ConfigError(f"--watch must be >= 0 seconds, got {args.watch}")
    if args.server:
        conn = connection_from_args(args)
        data = report.from_server(conn.server, token=conn.token or "", watch_s=args.watch, dataset=args.dataset,
                                  replay=not args.no_replay, tls_ca=conn.tls_ca,
                                  tls_server_name=conn.tls_server_name, mix=args.mix)
    else:
        from croupier.server.durability.remote_state import local_copy

        with local_copy(args.state_dir) as state_dir:  # an s3:// state directory is read from a fetched copy
            data = report.from_state_dir(state_dir, dataset=args.dataset, selection=args.selection,
                                         replay=not args.no_replay, mix=args.mix)
    paths = report.write_report(data, args.out)
    if args.table:
        print(report.cluster_table(data, limit=args.table))
    if data.source_names is not None:
        print(report.source_table(data))
    for note in data.notes:
        print(f"note: {note}")
    for path in paths:
        print(f"wrote {path}")
    print(f"open {args.out.rstrip('/')}/index.html")
    return 0
