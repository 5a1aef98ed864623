"""Bearer tokens: the shared secret a job's server, agents and ranks present to each other.

Read from a file (never a flag, so it stays out of process listings) by every command that
serves or connects; the server's interceptor (`croupier.server.serving.auth`) checks it and
the channel opener (`croupier.client.channel`) sends it.
"""

from __future__ import annotations

from pathlib import Path

from croupier.errors import ConfigError

__all__ = ["MIN_SERVER_TOKEN_CHARS", "read_token_file"]


MIN_SERVER_TOKEN_CHARS = 16
"""Shortest token a server accepts in its token files: a short token can be guessed."""


def read_token_file(path: str | Path, min_length: int = 1) -> str:
    """The token in `path` (surrounding whitespace stripped); refuses an empty or short one."""
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"token file {path} is empty")
    if any(c.isspace() for c in token):
        raise ConfigError(f"token in {path} contains whitespace")
    if len(token) < min_length:
        raise ConfigError(f"token in {path} has {len(token)} characters; a server token needs at least "
                          f"{min_length} (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token
