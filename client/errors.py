"""The client's exception hierarchy: every gRPC failure becomes a typed `ClientError`.

A trainer catches `croupier.errors.CroupierError` (or a subclass below) and reads the server's
own message; it never has to import grpc or compare status codes. Each status the server uses
on purpose has its own class; anything else is a plain `ClientError` that still carries the
code and the server's details.
"""

from __future__ import annotations

import grpc

from croupier.errors import CroupierError


class ClientError(CroupierError):
    """A call to the sampler server failed; `code` is the gRPC status, `details` its message."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.details = details


class Unauthenticated(ClientError):
    """The server refused the caller's credentials (missing or wrong token)."""


class PermissionDenied(Unauthenticated):
    """The caller is authenticated but may not make this call (e.g. Update without the admin token)."""


class InvalidRequest(ClientError):
    """The server refused the request's values (rank outside the world, bad batch, bad step)."""


class Mismatch(ClientError):
    """The request contradicts the job (other job name, world or batch, checkpoint of another
    dataset or config, step outside the server's bound)."""


class OutOfRange(ClientError):
    """The requested step lies outside what the server can deliver."""


class Unavailable(ClientError):
    """The server could not be reached (within the client's retry budget)."""


class NotFound(ClientError):
    """The server does not know the named job, checkpoint or resource."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: Mismatch,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def from_rpc_error(error: grpc.RpcError, call: str) -> ClientError:
    """Wraps a failed `call` (an RPC name) as the `ClientError` subclass of its status."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    cls = _BY_CODE.get(code, ClientError) if code is not None else ClientError
    name = code.name if code is not None else "UNKNOWN"
    return cls(f"{call} failed ({name}): {details}", code=code, details=details)


def from_status(code_name: str, details: str, call: str) -> ClientError:
    """Wraps a failure reported in-band (a Session lane event: a status code name and the
    server's message) as the `ClientError` subclass of that status."""
    code = getattr(grpc.StatusCode, code_name, None)
    cls = _BY_CODE.get(code, ClientError) if code is not None else ClientError
    return cls(f"{call} failed ({code_name}): {details}", code=code, details=details)


def is_transient_code(code: grpc.StatusCode | None) -> bool:
    """Whether a status is worth retrying after a backoff (server down, restarting, re-formed)."""
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)


def is_transient(error: grpc.RpcError) -> bool:
    """Whether a failure is worth retrying after a backoff (server down or restarting)."""
    code = error.code() if hasattr(error, "code") else None
    return code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)
