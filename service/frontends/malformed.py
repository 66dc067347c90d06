"""Request bytes that are not the protobuf message they claim to be: INVALID_ARGUMENT.

grpc runs a method's request deserializer (the generated `Message.FromString`)
before our handler. Garbage, a truncated message or a string field that is not
UTF-8 makes it raise DecodeError there, which grpc answers UNKNOWN "Unexpected
<class 'DecodeError'>" after logging a traceback, and which ends a whole
inference stream with INTERNAL.

`guard` rebuilds a method handler around a deserializer that never raises: it
returns a `Malformed` marker instead, and the handler's behaviour is wrapped
to answer the marker before the servicer sees it.

- A unary request: the call ends INVALID_ARGUMENT "malformed <type> message".
- A request stream: reading stops at the malformed message, as if the client
  had closed its side. Everything read before it is answered as usual, then
  the call ends INVALID_ARGUMENT naming the message's position on the stream.
  Ending the stream, rather than answering the message alone, is deliberate:
  nothing in unparseable bytes says which request they were (no id), so an
  answer could not be matched to one, and a client that sent them is out of
  step with the protocol.

Nothing is logged: malformed input is the client's mistake, not the server's.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the guarded deserializer returns for bytes it could not parse."""

    message_type: str
    size_bytes: int

    def problem(self, position: int | None = None) -> str:
        where = f" (message #{position} on this stream)" if position is not None else ""
        return (f"malformed {self.message_type} message{where}: its {self.size_bytes} bytes "
                "are not a valid protobuf encoding of it (garbage, truncated, or a string "
                "field that is not UTF-8)")


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = descriptor.full_name if descriptor is not None else "request"

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            return Malformed(message_type, len(data))

    return deserialize


async def _until_malformed(requests: AsyncIterator[Any], found: list[str]) -> AsyncIterator[Any]:
    """The stream's requests up to the first malformed one; its problem goes to `found`."""
    position = 0
    async for request in requests:
        position += 1
        if type(request) is Malformed:
            found.append(request.problem(position))
            return
        yield request


def _unary_request(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    if inspect.isasyncgenfunction(behavior):
        async def answer_stream(request: Any, context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[Any]:
            if type(request) is Malformed:
                await context.abort(_INVALID, request.problem())
            async for response in behavior(request, context):
                yield response

        return answer_stream
    if inspect.iscoroutinefunction(behavior):
        async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if type(request) is Malformed:
                await context.abort(_INVALID, request.problem())
            return await behavior(request, context)

        return answer
    return None


def _stream_request(behavior: Callable[..., Any]) -> Callable[..., Any] | None:
    if inspect.isasyncgenfunction(behavior):
        async def answer_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[Any]:
            found: list[str] = []
            async for response in behavior(_until_malformed(requests, found), context):
                yield response
            if found:
                await context.abort(_INVALID, found[0])

        return answer_stream
    if inspect.iscoroutinefunction(behavior):
        async def answer(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            found: list[str] = []
            result = await behavior(_until_malformed(requests, found), context)
            if found:
                await context.abort(_INVALID, found[0])
            return result

        return answer
    return None


def guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` answering malformed requests INVALID_ARGUMENT (see the module docstring).

    A handler whose behaviour is not async, or that takes raw bytes, is returned as is.
    """
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    field = {(False, False): "unary_unary", (False, True): "unary_stream",
             (True, False): "stream_unary", (True, True): "stream_stream"}[
        (handler.request_streaming, handler.response_streaming)]
    behavior = getattr(handler, field)
    wrap = _stream_request if handler.request_streaming else _unary_request
    guarded = wrap(behavior)
    if guarded is None:
        return handler
    # The handlers grpc's factories build are named tuples.
    return handler._replace(  # type: ignore[attr-defined]
        request_deserializer=_tolerant(deserializer), **{field: guarded})
