"""Bearer-token authentication: one check (`BearerToken`) for every protocol; gRPC runs
it once per call in a server interceptor, HTTP in a middleware (frontends/http.py)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from trtserve.service.errors import ConfigError

TOKEN_ENV = "TRTSERVE_AUTH_TOKEN"
HEALTH_PREFIX = "/grpc.health.v1.Health/"


def load_token(token_file: str) -> str | None:
    """The token from the file if given, else from TRTSERVE_AUTH_TOKEN; None: no auth.

    A blank file or a set-but-blank variable is refused: a secret that came out
    empty must not start an open server.

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
        return _checked(token, f"server.auth_token_file ({token_file})")
    if TOKEN_ENV not in os.environ:
        return None
    token = os.environ[TOKEN_ENV].strip()
    if not token:
        # Set from a secret that came out blank: refuse, never fall back to no auth.
        raise ConfigError(f"{TOKEN_ENV} is set but blank; set it to the token, or unset it "
                          "to serve without authentication")
    return _checked(token, TOKEN_ENV)


def _checked(token: str, source: str) -> str:
    """gRPC metadata values are visible ASCII; any other token could never be sent."""
    if not all("!" <= ch <= "~" for ch in token):
        raise ConfigError(f"{source}: the token must be printable ASCII without spaces "
                          f"(gRPC metadata cannot carry anything else)")
    return token


MISSING_MESSAGE = ("missing bearer token: send metadata 'authorization: Bearer <token>' "
                   "(the server requires a token)")
INVALID_MESSAGE = "invalid bearer token in 'authorization' metadata"
SCHEME_MESSAGE = "'authorization' metadata must be 'Bearer <token>'"


# The same problems, as an HTTP client is told them.
HTTP_MESSAGES = {
    "missing": "missing bearer token: send the header 'Authorization: Bearer <token>' "
               "(the server requires a token)",
    "invalid": "invalid bearer token in the 'Authorization' header",
    "scheme": "the 'Authorization' header must be 'Bearer <token>'",
}


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class BearerToken:
    """Checks `Bearer <token>` credentials against the server's token.

    Compared in constant time (of SHA-256 digests, so not even the token's
    length shows in the timing).
    """

    def __init__(self, token: str) -> None:
        self._expected = _digest(token.encode())

    def problem(self, value: str | bytes | None) -> str:
        """'' when `value` (an authorization header, None: absent) carries the token,
        else what is wrong: "missing", "scheme" or "invalid"."""
        if value is None:
            return "missing"
        given = value.encode() if isinstance(value, str) else value
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return "scheme"
        # Constant time, so response timing does not reveal a prefix match.
        return "" if hmac.compare_digest(_digest(token.strip()), self._expected) else "invalid"


def _deny_handlers(message: str) -> dict[bool, grpc.RpcMethodHandler]:
    """A handler that answers UNAUTHENTICATED with `message`, by response streaming.

    The deny handler must match the response kind of the handler it replaces (e.g.
    Health/Watch is unary-stream), or grpc.aio fails the call with UNKNOWN. Its
    requests are always taken as a stream, never read: grpc.aio reads a unary
    request's message before it runs the handler, so a unary deny would wait for a
    message that a hostile client never sends, holding the call open.
    """

    async def deny(requests: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return {False: grpc.stream_unary_rpc_method_handler(deny),
            True: grpc.stream_stream_rpc_method_handler(deny)}


class TokenAuth(grpc.aio.ServerInterceptor):
    """Lets a call through only with `authorization: Bearer <token>` metadata.

    The token is checked by `BearerToken`. Health checks stay open unless
    `health_requires_auth`, so orchestrators can probe without the secret.
    """

    def __init__(self, token: str, health_requires_auth: bool = False) -> None:
        self._token = BearerToken(token)
        self._open_health = not health_requires_auth
        self._deny = {problem: _deny_handlers(message) for problem, message in (
            ("missing", MISSING_MESSAGE), ("invalid", INVALID_MESSAGE),
            ("scheme", SCHEME_MESSAGE))}

    def _problem(self, details: grpc.HandlerCallDetails) -> str:
        """'' when the call carries the right token, else what is wrong with it."""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                return self._token.problem(value)
        return "missing"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if self._open_health and method.startswith(HEALTH_PREFIX):
            return await continuation(handler_call_details)
        problem = self._problem(handler_call_details)
        if not problem:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        streams = handler is not None and bool(handler.response_streaming)
        return self._deny[problem][streams]
