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

The same deserializer refuses, unparsed, a message of more than MAX_FIELDS
fields (tensors, names, map entries, numbers sent unpacked: see
field_count.py), which no real request comes near: parsing them is what a
message of many tiny fields costs the event loop. Only messages of at least
COUNT_FROM_BYTES are counted; a smaller one parses quickly even at worst (the
timings: docs/reliability.md, "Hostile messages at the protocol edge").

Nothing is logged: malformed input is the client's mistake, not the server's.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError

from trtserve.service.frontends import field_count

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Fields a request message may hold, at any depth (field_count.exceeds). A
# request with 500 inputs of 8 fields each holds about 4,000. What counting up
# to the limit costs: docs/reliability.md, "Hostile messages at the protocol edge".
MAX_FIELDS = 16_384
# Messages smaller than this are not counted: at most ~32,000 fields (empty
# tensors), cheap to parse even so (docs/reliability.md, same section).
COUNT_FROM_BYTES = 64 * 1024

_UNPARSEABLE = ("are not a valid protobuf encoding of it (garbage, truncated, or a string "
                "field that is not UTF-8)")
_TOO_MANY = (f"hold more than {MAX_FIELDS} fields (tensors, names, parameters, dimensions); "
             "no request needs that many, and it was refused unparsed")


@dataclass(frozen=True, slots=True)
class Malformed:
    """What the guarded deserializer returns for bytes it would not parse."""

    message_type: str
    size_bytes: int
    why: str = _UNPARSEABLE

    def problem(self, position: int | None = None) -> str:
        where = f" (message #{position} on this stream)" if position is not None else ""
        return f"malformed {self.message_type} message{where}: its {self.size_bytes} bytes " \
               f"{self.why}"


def _tolerant(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor: Descriptor | None = getattr(owner, "DESCRIPTOR", None)
    message_type = descriptor.full_name if descriptor is not None else "request"

    def deserialize(data: bytes) -> Any:
        if descriptor is not None and len(data) >= COUNT_FROM_BYTES and \
                field_count.exceeds(data, descriptor, MAX_FIELDS):
            return Malformed(message_type, len(data), _TOO_MANY)
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
            responses = behavior(request, context)
            del request  # as in `answer` below
            async for response in responses:
                yield response

        return answer_stream
    if inspect.iscoroutinefunction(behavior):
        async def answer(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if type(request) is Malformed:
                await context.abort(_INVALID, request.problem())
            call = behavior(request, context)
            # An abort's traceback runs through this frame and grpc.aio keeps it in
            # reference cycles: holding the request here would keep a large request's
            # bytes resident (frontends/errors.py says more).
            del request
            return await call

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
