"""The `croupier` console script: one entry point, sub-commands registered by module.

Each module listed in `COMMAND_MODULES` exposes `register(subparsers)`, which adds its
sub-command(s) and sets `func` on the parser; `func(args)` returns the exit code. Errors
derived from `CroupierError` print as one clear line and exit 2, and so does a missing
Python module (with what to install, `croupier.optional`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from croupier import __version__
from croupier.errors import CroupierError

COMMAND_MODULES: tuple[str, ...] = (
    "croupier.server.cli.simulate_cli",
    "croupier.server.cli.serve_cli",
    "croupier.client.cli.admin_cli",
    "croupier.client.cli.dump_cli", "croupier.client.cli.agent_cli",
    "croupier.shards.cli.dispatch",
    "croupier.apps.demo_cli", "croupier.apps.report_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="croupier",
        description="Cluster-balanced, repeat-clipped data loading for training clusters.",
    )
    parser.add_argument("--version", action="version", version=f"croupier {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CroupierError as exc:
        print(f"croupier {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an import the code did not wrap: still one line
        if not exc.name:
            raise
        from croupier.optional import install_hint

        print(f"croupier {args.command}: error: the Python module {exc.name!r} is not installed: "
              f"{install_hint(exc.name)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
