"""Bearer-token authentication for the sampler server, as a gRPC server interceptor.

With a token configured, every call must carry metadata `authorization: Bearer <token>`;
otherwise it is refused with UNAUTHENTICATED before it reaches the servicer. The health
service (`grpc.health.v1.Health`) stays open so orchestrator probes, which cannot send
metadata, keep working; it reveals nothing but SERVING/NOT_SERVING. Reflection is not exempt.

With a token configured, `Update` (an online change of the sampling) needs the admin token
(`--admin-token-file`); the plain token gets PERMISSION_DENIED, and so does everyone when no
admin token is configured. The admin token is accepted for every other call too. With no token
at all, the server trusts its network (it binds to loopback unless told otherwise) and
`Update` is open.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import grpc

from croupier.errors import ConfigError
from croupier.grpc_options import AUTH_METADATA_KEY

OPEN_SERVICES = ("/grpc.health.v1.Health/",)
"""Method-name prefixes callable without a token."""

ADMIN_METHODS = ("/croupier.v1.Sampler/Update",)
"""Methods that need the admin token."""


class TokenRules:
    """Who may call what: the bearer-token rules, apart from any gRPC server flavour."""

    def __init__(self, token: str | None, admin_token: str | None = None,
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        if token is None and admin_token is not None:
            raise ConfigError("an admin token needs a plain token too (--token-file)")
        self._tokens = tuple(t.encode() for t in (token, admin_token) if t)
        self._admin = admin_token.encode() if admin_token else None
        self._on_refused = on_refused

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    @staticmethod
    def _presented(metadata) -> bytes | None:
        for key, value in metadata or ():
            if key == AUTH_METADATA_KEY:
                value = value.decode() if isinstance(value, bytes) else value
                if value.startswith("Bearer "):
                    return value[len("Bearer "):].strip().encode()
                return b""
        return None

    def refusal(self, method: str, metadata) -> tuple[grpc.StatusCode, str] | None:
        """(status, message) refusing a call of `method` with `metadata`, or None to let it through."""
        if not self._tokens or method.startswith(OPEN_SERVICES):
            return None
        got = self._presented(metadata)
        if got is None or not any(hmac.compare_digest(got, t) for t in self._tokens):
            why = "missing" if got is None else "invalid"
            refused = (grpc.StatusCode.UNAUTHENTICATED,
                       f"{why} bearer token: this server requires metadata '{AUTH_METADATA_KEY}: Bearer <token>'")
        elif method in ADMIN_METHODS and (self._admin is None or not hmac.compare_digest(got, self._admin)):
            refused = (grpc.StatusCode.PERMISSION_DENIED,
                       f"{method.rsplit('/', 1)[-1]} needs the admin token (server started with --admin-token-file)")
        else:
            return None
        if self._on_refused is not None:
            self._on_refused(method, refused[0])
        return refused


def _denying_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str):
    """A coroutine handler of the same streaming shape as `handler` that aborts with `code`."""

    async def unary(request, context):  # noqa: ARG001 - grpc handler signature
        await context.abort(code, message)

    async def streaming(request, context):  # noqa: ARG001
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    kind = (handler.request_streaming, handler.response_streaming)
    des, ser = handler.request_deserializer, handler.response_serializer
    if kind == (False, False):
        return grpc.unary_unary_rpc_method_handler(unary, des, ser)
    if kind == (False, True):
        return grpc.unary_stream_rpc_method_handler(streaming, des, ser)
    if kind == (True, False):
        return grpc.stream_unary_rpc_method_handler(unary, des, ser)
    return grpc.stream_stream_rpc_method_handler(streaming, des, ser)


class AsyncTokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without the right bearer token (see module docstring), on the asyncio server."""

    def __init__(self, token: str | None, admin_token: str | None = None,
                 on_refused: Callable[[str, grpc.StatusCode], None] | None = None) -> None:
        self._rules = TokenRules(token, admin_token, on_refused)

    @property
    def enabled(self) -> bool:
        return self._rules.enabled

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        refused = self._rules.refusal(handler_call_details.method, handler_call_details.invocation_metadata)
        return handler if refused is None else _denying_handler(handler, *refused)
