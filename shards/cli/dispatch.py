"""`croupier shards ...`: offline dataset preparation commands.

The `shards` command gathers sub-commands from the modules in `SHARDS_COMMAND_MODULES`;
each exposes `register(subparsers)` like the top-level command modules do.
"""

from __future__ import annotations

import argparse
import importlib

SHARDS_COMMAND_MODULES: tuple[str, ...] = (
    "croupier.shards.cli.build_cli",
    "croupier.shards.cli.inspect_cli",
    "croupier.shards.cli.score_cli",
    "croupier.shards.cli.select_cli",
    "croupier.shards.cli.tokens_cli",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shards", help="prepare datasets: build MDS shards + cluster sidecar, inspect, plot",
        description="Offline dataset preparation: write MDS shards, embed, cluster, and keep the "
                    "cluster sidecar the sampler reads.")
    sub = parser.add_subparsers(dest="shards_command", metavar="SUBCOMMAND")
    sub.required = True
    for name in SHARDS_COMMAND_MODULES:
        importlib.import_module(name).register(sub)
