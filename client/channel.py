"""Opening a channel to the sampler server: options, TLS, and the bearer-token metadata.

Channel options (message size limits, keepalive) come from `croupier.grpc_options`,
the one place both ends read them, so they always agree. Channels are opened lazily by the
client objects, inside the process that uses them: a gRPC channel does not survive fork().
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

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


def open_channel(address: str, tls_root_cert: str | os.PathLike | bytes | None = None, *,
                 server_name: str | None = None) -> grpc.Channel:
    """A channel to `address` ("host:port"); TLS when a root certificate (PEM path or bytes) is given.

    server_name: the name to check in the server's certificate when `address` is not it
    (e.g. an IP address)."""
    if not address or ":" not in address:
        raise ConfigError(f"server address must be host:port, got {address!r}")
    options = channel_options()
    if tls_root_cert is None:
        if server_name:
            raise ConfigError("a TLS server name needs a TLS root certificate (--tls-ca)")
        return grpc.insecure_channel(address, options=options)
    if isinstance(tls_root_cert, bytes):
        pem = tls_root_cert
    else:
        path = Path(tls_root_cert)
        try:
            pem = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read TLS root certificate {str(path)!r}: {exc.strerror}") from None
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=pem), options=options)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (or $CROUPIER_TOKEN when None); empty without a token."""
    token = os.environ.get(TOKEN_ENV) if token is None else token
    if not token:
        return ()
    from croupier.grpc_options import bearer

    return bearer(token)
