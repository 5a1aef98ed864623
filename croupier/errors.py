"""One exception hierarchy for every part of croupier.

Each error carries a message that names the rule that was broken and the bad value, so a
user reading a log line knows what to change. The server maps these to gRPC status codes;
the client re-raises gRPC failures as the matching subclass with the server's message.
"""

from __future__ import annotations


class CroupierError(Exception):
    """Base class of every error croupier raises on purpose."""


class ConfigError(CroupierError, ValueError):
    """A configuration value breaks a rule (bad policy name, clip < 1, batch not divisible...)."""


class FingerprintMismatch(CroupierError):
    """A state, checkpoint, sidecar or cache belongs to another dataset or configuration."""

    def __init__(self, what: str, expected: str, got: str) -> None:
        super().__init__(f"{what} fingerprint mismatch: expected {expected}, got {got}")
        self.what = what
        self.expected = expected
        self.got = got


class StateError(CroupierError):
    """A serialized state is corrupt, truncated, or of an unknown version."""


class EndOfData(CroupierError):
    """Every cluster is exhausted under the clip and the policy says stop.

    `step` is the first step whose global batch could not be filled.
    """

    def __init__(self, step: int, message: str | None = None) -> None:
        super().__init__(message or f"end of data at step {step}: every cluster has reached its clip")
        self.step = step


class DatasetError(CroupierError):
    """A dataset, shard or sidecar is missing, unreadable, or corrupt."""


class MissingDependency(CroupierError):
    """A Python package a feature needs is not installed; the message says what to install."""

    def __init__(self, module: str, purpose: str, hint: str) -> None:
        super().__init__(f"{purpose} needs the Python module {module!r}, which is not installed: {hint}")
        self.module = module
        self.purpose = purpose
        self.hint = hint


class ReportRefused(ConfigError):
    """A loss report breaks a rule; it is refused whole and changes nothing.

    A ConfigError (so a CroupierError and a ValueError): the servicer maps it to
    INVALID_ARGUMENT (a malformed report) or FAILED_PRECONDITION (rule `dealt`)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"loss report refused ({rule}): {message}")
        self.rule = rule
