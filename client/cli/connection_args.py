"""The connection flags every client command shares, parsed in one place.

    --server HOST:PORT      the sampler server
    --token-file FILE       bearer token (default: $CROUPIER_TOKEN)
    --tls-ca PEM            use TLS, trusting this CA or self-signed certificate
                            (--tls-root-cert: the former name, still accepted)
    --tls-server-name NAME  the name to check in the certificate when the address differs

Every command that connects declares them here (`status`, `checkpoint`, `update`,
`client dump`, `agent`, `report`) and turns them into a `croupier.client.channel.ChannelConfig`,
the one channel opener's input.

A token given on the command line is visible to every local user in `ps`; a file or the
environment is not, so commands take `--token-file` and `$CROUPIER_TOKEN`.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from croupier import bounds
from croupier.client.channel import TOKEN_ENV, ChannelConfig
from croupier.errors import ConfigError

if TYPE_CHECKING:
    import grpc


def _deprecated_alias(new: str) -> type[argparse.Action]:
    """An action for an old flag name: stores into the new flag's destination and says, on
    stderr, which name to use instead."""

    class Alias(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):  # noqa: ARG002
            print(f"croupier: {option_string} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return Alias


def add_connection_arguments(p: argparse.ArgumentParser, *, server_required: bool = True,
                             token_flag: bool = False, server_name: bool = True) -> None:
    """Adds the shared flags; `token_flag` also accepts `--token` (kept for compatibility);
    `server_name=False` leaves out --tls-server-name (kept for callers that passed it: every
    command of croupier's own takes the flag)."""
    if server_required:
        p.add_argument("--server", required=True, metavar="HOST:PORT", help="the sampler server")
    p.add_argument("--token-file", default=None, metavar="FILE", help=f"bearer token file (default: ${TOKEN_ENV})")
    if token_flag:
        p.add_argument("--token", default=None,
                       help="bearer token (visible in ps: prefer --token-file or $CROUPIER_TOKEN)")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="use TLS, trusting this CA (or self-signed) certificate")
    p.add_argument("--tls-root-cert", dest="tls_ca", action=_deprecated_alias("--tls-ca"), help=argparse.SUPPRESS)
    if server_name:
        p.add_argument("--tls-server-name", default=None, metavar="NAME",
                       help="name to check in the server certificate (when the address is not that name)")


@dataclass(frozen=True)
class Connection:
    """Where and how a client command connects."""

    server: str
    token: str | None
    tls_ca: str | None
    tls_server_name: str | None

    def channel_config(self) -> ChannelConfig:
        """The channel opener's view of these flags (the token already resolved: none is "")."""
        return ChannelConfig(self.server, self.tls_ca, self.tls_server_name, self.token or "")

    def open(self) -> grpc.Channel:
        """A gRPC channel (TLS when --tls-ca was given)."""
        return self.channel_config().open()


def resolve_token(token: str | None = None, token_file: str | None = None) -> str | None:
    """The bearer token: --token-file, else --token, else $CROUPIER_TOKEN, else none."""
    if token is not None and token_file is not None:
        raise ConfigError("give --token or --token-file, not both")
    if token_file is not None:
        from croupier.bearer import read_token_file

        return read_token_file(token_file)
    if token is not None:
        return token
    return os.environ.get(TOKEN_ENV) or None


def connection_from_args(args: argparse.Namespace) -> Connection:
    """The flags of `add_connection_arguments`, checked: --server is HOST:PORT with a port in
    1..65535 (`croupier.bounds.address`), --tls-server-name needs --tls-ca."""
    server_name = getattr(args, "tls_server_name", None)
    if server_name and not args.tls_ca:
        raise ConfigError("--tls-server-name needs --tls-ca (it names the server in its TLS certificate)")
    if getattr(args, "server", None) is not None:
        bounds.address("--server", args.server)
    return Connection(server=args.server, token=resolve_token(getattr(args, "token", None), args.token_file),
                      tls_ca=args.tls_ca, tls_server_name=server_name)
