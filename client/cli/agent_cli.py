"""`croupier agent`: run this node's agent in the foreground until SIGTERM.

    croupier agent --server HOST:PORT --runtime-dir DIR --cache-dir DIR [--cache-limit SIZE]
                   [--job NAME] [--node NAME] [--local-ranks N]
                   [--token-file F] [--tls-ca PEM] [--tls-server-name NAME]

The connection flags are every client command's (`croupier.client.cli.connection_args`);
`--tls-root-cert` still works and says it is deprecated, as everywhere.

Ranks and DataLoader workers whose environment has CROUPIER_AGENT=DIR (the runtime directory)
then talk only to this agent. See docs/agent.md.
"""

from __future__ import annotations

import argparse
import os

from croupier import bounds
from croupier.client.cli.connection_args import add_connection_arguments, connection_from_args
from croupier.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("agent", help="the node agent: one server stream and one shard cache per node")
    add_connection_arguments(p)
    p.add_argument("--runtime-dir", required=True, metavar="DIR",
                   help="per-job directory for the agent's socket (created 0700); ranks get CROUPIER_AGENT=DIR")
    p.add_argument("--cache-dir", required=True, metavar="DIR", help="the node's shard cache")
    p.add_argument("--cache-limit", default=None, metavar="SIZE",
                   help="most bytes of shards the node keeps, with units (e.g. 20GiB); default: no limit")
    p.add_argument("--job", default="", help="the job name (default: whatever the ranks join)")
    p.add_argument("--node", default=None, help="node name shown in status (default: the host name)")
    p.add_argument("--exit-when-idle", type=float, default=0.0, metavar="SECONDS",
                   help="exit after this long without consumers (0, the default: run until SIGTERM)")
    p.add_argument("--local-ranks", type=int, default=None, metavar="N",
                   help="ranks on this node (default: $LOCAL_WORLD_SIZE as torchrun sets it, else unknown). The "
                        "agent opens one server lane for the node's ranks once all N have asked for slices "
                        "(at most 10 s), so the server's work per step follows nodes, not ranks")
    p.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    p.set_defaults(func=run_agent_cli)


def local_ranks(flag: int | None) -> int:
    """--local-ranks, else $LOCAL_WORLD_SIZE, else 0 (unknown); refuses a negative count."""
    if flag is None:
        env = os.environ.get("LOCAL_WORLD_SIZE", "")
        if not env:
            return 0
        try:
            flag = int(env)
        except ValueError:
            raise ConfigError(f"LOCAL_WORLD_SIZE must be an integer, got {env!r}") from None
    return bounds.int_range("--local-ranks", flag, 0, bounds.INT32_MAX, "ranks on this node, 0: unknown")


def run_agent_cli(args: argparse.Namespace) -> int:
    from croupier import logs
    from croupier.client.agent.daemon import NodeAgent, run_agent
    from croupier.values import parse_log_level, parse_size

    bounds.duration("--exit-when-idle", args.exit_when_idle, zero_ok=True)
    parse_log_level(args.log_level)
    ranks = local_ranks(args.local_ranks)
    conn = connection_from_args(args)
    limit = None if args.cache_limit is None else parse_size(args.cache_limit)
    logs.configure(args.log_level)  # every flag checked first: a refusal is one line on stderr
    agent = NodeAgent(conn.server, args.runtime_dir, args.cache_dir, cache_limit=limit, job=args.job,
                      token=conn.token or "", tls_root_cert=conn.tls_ca, tls_server_name=conn.tls_server_name,
                      node=args.node, idle_exit_s=args.exit_when_idle, local_ranks=ranks)
    run_agent(agent)
    return 0
