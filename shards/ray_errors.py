"""Croupier errors across Ray: carried back as data, re-raised on the driver with their type.

Ray Data keeps only a traceback's text of an exception raised inside a map or an actor, and
Ray wraps a task's exception in its own error types. The build's and the scorers' workers
therefore catch a `CroupierError` and return it as a row (`error_row`), the driver re-raises
it (`raise_error_row`), and a failure that still carries a croupier error somewhere in its
chain is unwrapped to it (`unwrap`), so the user sees the message the local engine prints.
"""

from __future__ import annotations

import json

from croupier.errors import CroupierError, DatasetError


def error_row(exc: CroupierError) -> str:
    """The error as a JSON row field: its class name and message."""
    return json.dumps({"type": type(exc).__name__, "message": str(exc)})


def raise_error_row(text: str) -> None:
    """Re-raise on the driver a croupier error that a Ray worker returned as data ("" is no error).

    The class is looked up in `croupier.errors`; an unknown name (or `FingerprintMismatch`,
    whose constructor takes more than a message) is raised as a `DatasetError`.
    """
    if not text:
        return
    import croupier.errors as errors

    err = json.loads(text)
    cls = getattr(errors, err["type"], None)
    if not (isinstance(cls, type) and issubclass(cls, CroupierError)) or cls is errors.FingerprintMismatch:
        cls = DatasetError
    raise cls(err["message"])


def unwrap(exc: BaseException) -> BaseException:
    """The croupier error a Ray (Data) failure carries, else the failure itself."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, CroupierError):
            cause = getattr(e, "cause", None)
            if isinstance(cause, CroupierError):
                return cause
            return e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return exc
