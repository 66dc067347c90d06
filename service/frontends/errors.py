"""One place that turns exceptions into gRPC statuses, for every servicer.

Known errors (service.errors.ServeError) carry messages written for clients.
Anything else is logged with its traceback and answered with a generic
INTERNAL: its text may hold paths or internals that are not the client's.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.errors import ServeError

log = logging.getLogger(__name__)

T = TypeVar("T")
INTERNAL_MESSAGE = "internal error; see the server log"


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
