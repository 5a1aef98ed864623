"""Opening a channel to the sampler server: options, TLS, server name and the bearer token.

The one opener of the client side: `RankClient` (sync gRPC), the node agent (grpc.aio), the
dump and admin commands all describe the server as a `ChannelConfig` and open it here, so
TLS, the certificate's server name and the bearer token mean the same everywhere.

Channel options (message size limits, keepalive) come from `croupier.grpc_options`,
the one place both ends read them, so they always agree. Channels are opened lazily by the
client objects, inside the process that uses them: a gRPC channel does not survive fork().
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from croupier.errors import ConfigError

TOKEN_ENV = "CROUPIER_TOKEN"


# gRPC's own reconnect backoff starts at 1 s and grows to 2 min; a restarted server should be
# found again within a fraction of a second, and the client adds its own jittered backoff.
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

def channel_options() -> list[tuple[str, int | str]]:
    """The client-side channel options agreed with the server, plus a short reconnect backoff."""
    from croupier import grpc_options

    return [*grpc_options.channel_options(), *RECONNECT_OPTIONS]


@dataclass(frozen=True)
class ChannelConfig:
    """Where and how to reach the sampler server.

    address: "host:port".
    tls_root_cert: PEM path or bytes of the CA (or self-signed certificate) to trust; None:
        no TLS.
    server_name: the name to check in the server's certificate when `address` is not it
        (e.g. an IP address); needs `tls_root_cert`.
    token: bearer token sent with every call (None: $CROUPIER_TOKEN; "": none).

    Validated at construction; the certificate file is read when a channel opens.
    """

    address: str
    tls_root_cert: str | os.PathLike[str] | bytes | None = None
    server_name: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if not self.address or ":" not in self.address:
            raise ConfigError(f"server address must be host:port, got {self.address!r}")
        if self.server_name and self.tls_root_cert is None:
            raise ConfigError("a TLS server name needs a TLS root certificate (--tls-ca)")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the bearer token; empty without one."""
        return auth_metadata(self.token)

    def open(self) -> grpc.Channel:
        """A synchronous channel (`grpc.secure_channel` with TLS, else `grpc.insecure_channel`)."""
        credentials, options = self._credentials()
        if credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, credentials, options=options)

    def open_aio(self) -> grpc.aio.Channel:
        """An asyncio channel (`grpc.aio`), with the same TLS and options as `open()`."""
        credentials, options = self._credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.address, options=options)
        return grpc.aio.secure_channel(self.address, credentials, options=options)

    def _credentials(self) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, int | str]]]:
        options = channel_options()
        if self.tls_root_cert is None:
            return None, options
        if isinstance(self.tls_root_cert, bytes):
            pem = self.tls_root_cert
        else:
            path = Path(self.tls_root_cert)
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ConfigError(f"cannot read TLS root certificate {str(path)!r}: {exc.strerror}") from None
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.ssl_channel_credentials(root_certificates=pem), options


def open_channel(address: str, tls_root_cert: str | os.PathLike[str] | bytes | None = None, *,
                 server_name: str | None = None) -> grpc.Channel:
    """A channel to `address` ("host:port"); TLS when a root certificate (PEM path or bytes) is
    given; `server_name` as in `ChannelConfig`."""
    return ChannelConfig(address, tls_root_cert, server_name).open()


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (or $CROUPIER_TOKEN when None); empty without a token."""
    token = os.environ.get(TOKEN_ENV) if token is None else token
    if not token:
        return ()
    from croupier.grpc_options import bearer

    return bearer(token)


__all__ = ["TOKEN_ENV", "ChannelConfig", "auth_metadata", "channel_options", "open_channel"]
