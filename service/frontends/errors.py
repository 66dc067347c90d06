"""One place that turns exceptions into gRPC statuses (and HTTP statuses), for every frontend.

Known errors (trtserve.service.errors.ServeError) carry messages written for clients.
Anything else is logged with its traceback and answered with a generic
INTERNAL: its text may hold paths or internals that are not the client's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from trtserve.service.errors import ServeError

log = logging.getLogger(__name__)

T = TypeVar("T")
INTERNAL_MESSAGE = "internal error; see the server log"


# The HTTP status of each gRPC status, as Google's API design maps them
# (google/rpc/code.proto), so that the REST and gRPC forms of a protocol answer
# one error alike: a bad tensor is 400 / INVALID_ARGUMENT, a full queue 429 /
# RESOURCE_EXHAUSTED, a draining model 503 / UNAVAILABLE.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}


def http_status_of(error: BaseException) -> tuple[int, str]:
    """The HTTP status and client message of `error` (unexpected ones logged, generic)."""
    code, message = status_of(error)
    return HTTP_STATUS[code], message


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServeError):
        return error.code, str(error)
    log.error("unexpected error", exc_info=error)
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def unary(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate an async unary servicer method: errors become gRPC statuses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except Exception as e:  # known errors, or the generic INTERNAL promised above
            code, message = status_of(e)
        # A refused request never reaches the engine, whose byte budget asks for memory
        # to be given back after large requests: the servicer's hook does it for these.
        on_refused = getattr(self, "on_refused", None)
        if on_refused is not None:
            on_refused(request)
        # grpc.aio keeps the abort's exception, and with its traceback this frame, in the
        # call's state, which lives in reference cycles that only the garbage collector
        # frees: neither the request nor the error (whose traceback holds the decoded
        # tensors) may stay reachable from here, or a large request's bytes stay resident
        # long after its answer. Hence the abort outside the except block, and the del.
        del request
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")

    return wrapper


def streaming(method: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    """Like `unary`, for methods that yield responses."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        try:
            async for item in method(self, request, context):
                yield item
            return
        except Exception as e:
            code, message = status_of(e)
        del request
        await context.abort(code, message)  # outside the except block: see `unary`

    return wrapper
