"""Resume tokens: the short string a trainer stores to resume the sampler at a step.

    croupier-ckpt-v1:<step>:<sampler fingerprint>:<checksum>

The checksum (16 hex digits of a keyed SHA-256 over step and fingerprint) makes a truncated,
edited or garbage token fail to parse instead of resuming at a wrong step. It detects
accidents, not forgery: the token carries no secret, and the server still checks the
fingerprint against its own job.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from croupier.errors import ConfigError

PREFIX = "croupier-ckpt-v1"
_KEY = b"croupier.token.v1"

__all__ = ["PREFIX", "CheckpointToken", "ResumeToken", "TokenError"]


class TokenError(ConfigError):
    """A resume token is not a well-formed croupier checkpoint token."""


@dataclass(frozen=True)
class ResumeToken:
    """Names the sampler state before `step` of the sequence `fingerprint`."""

    fingerprint: str
    step: int

    def encode(self) -> str:
        return f"{PREFIX}:{self.step}:{self.fingerprint}:{_checksum(self.step, self.fingerprint)}"

    @classmethod
    def decode(cls, token: str) -> ResumeToken:
        """Parses `token`; raises TokenError naming what is wrong with it."""
        shown = token if len(token) <= 80 else token[:77] + "..."
        head, sep, rest = token.partition(":")
        if head != PREFIX or not sep:
            raise TokenError(f"resume token {shown!r} is not a croupier checkpoint token (expected prefix {PREFIX!r})")
        step_s, sep, rest = rest.partition(":")
        body, sep2, mac = rest.rpartition(":")
        if not sep or not sep2 or not step_s.isdigit() or not body:
            raise TokenError(f"resume token {shown!r} is malformed: expected {PREFIX}:<step>:<fingerprint>:<checksum>")
        step = int(step_s)
        if not hmac.compare_digest(mac, _checksum(step, body)):
            raise TokenError(f"resume token {shown!r} fails its checksum: it was truncated or edited")
        return cls(fingerprint=body, step=step)


CheckpointToken = ResumeToken
"""The former name (before the job's types were renamed for grep-ability): kept so that code
importing it goes on working; new code says ResumeToken."""


def _checksum(step: int, fingerprint: str) -> str:
    return hmac.new(_KEY, f"{step}:{fingerprint}".encode(), hashlib.sha256).hexdigest()[:16]
