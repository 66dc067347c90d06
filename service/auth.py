"""Bearer-token authentication, checked once per call in a server interceptor."""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from service.errors import ConfigError

TOKEN_ENV = "TRTSERVE_AUTH_TOKEN"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def load_token(token_file: str) -> str | None:
    """The token from the file if given, else from TRTSERVE_AUTH_TOKEN; None: no auth.

    Never from a command-line argument: those are visible in `ps` to every user.
    """
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"server.auth_token_file: cannot read {token_file}: "
                              f"{e.strerror}") from None
        if not token:
            raise ConfigError(f"server.auth_token_file: {token_file} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, health_requires_auth: bool = False) -> None:
        self._expected = f"Bearer {token}".encode()
        self._open_health = not health_requires_auth

        async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid bearer token in 'authorization' metadata")

        async def deny_stream(request: object, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or invalid bearer token in 'authorization' metadata")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny_stream)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                # Constant time, so response timing does not reveal a prefix match.
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if (self._open_health and method.startswith(HEALTH_PREFIX)) or \
                self._authorized(handler_call_details):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is not None and handler.request_streaming:
            return self._deny_stream
        return self._deny_unary
