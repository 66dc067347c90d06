"""Bidirectional inference streams: many requests in flight, answers as they finish.

Backpressure. A request is in flight from when it is read until its answer
has been written to the transport: grpc.aio asks this generator for the next
answer only once the previous one was sent, and HTTP/2 flow control holds a
send while the client does not read. While a stream holds its limit of
requests in flight, or of answer bytes not yet sent, it stops reading its
requests; gRPC then stops granting the client flow-control window and the
client's writes wait. A client that sends and never reads therefore gets
executed at most `max_in_flight` requests plus the answers its own HTTP/2
receive window took before it closed, and the server holds at most about
`max_unsent_bytes` of its answers (plus what gRPC buffers), whatever it sends.

Ids. A request's id may not repeat the id of a request still in flight on the
same stream (its answer not yet handed to gRPC): the answers could not be
told apart. The repeat is answered INVALID_ARGUMENT without running, and the
stream carries on. An empty id is exempt, as in Triton: a client that leaves
ids empty does not match answers by id.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from trtserve.service.errors import InvalidArgument, ResourceExhausted
from trtserve.service.frontends.unsent import Connection, Release

Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True)
class StreamLimits:
    """What one stream may hold before it stops reading (`server.max_*_per_stream`)."""

    max_in_flight: int = 1024
    max_unsent_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class StreamProtocol(Generic[Req, Resp]):
    """How a frontend runs, identifies, refuses and weighs its stream messages.

    handle: answers a request, turning its own failures into an error answer
        (the stream carries errors per request and stays open).
    refuse: the error answer for a request that is not run.
    id_of: the request's id ("" for none).
    size_of: about how many bytes an answer holds (its tensors and id), without
        serializing it: weighing it must cost far less than sending it.
    """

    handle: Callable[[Req], Awaitable[Resp]]
    refuse: Callable[[Req, Exception], Resp]
    id_of: Callable[[Req], str]
    size_of: Callable[[Resp], int]


class _Window:
    """What one stream holds: requests in flight and the bytes of answers not yet sent."""

    def __init__(self, limits: StreamLimits) -> None:
        self._limits = limits
        self.requests = 0
        self.answer_bytes = 0
        self._room = asyncio.Event()

    def full(self) -> bool:
        return (self.requests >= self._limits.max_in_flight
                or self.answer_bytes >= self._limits.max_unsent_bytes)

    def sent(self, size: int) -> None:
        self.requests -= 1
        self.answer_bytes -= size
        if not self.full():
            self._room.set()

    async def wait_for_room(self) -> None:
        while self.full():
            self._room.clear()
            await self._room.wait()


_DUPLICATE = ("request id is already in flight on this stream; ids must be unique "
              "until their answer has been sent (or empty)")


async def answer_stream(
    requests: AsyncIterator[Req],
    protocol: StreamProtocol[Req, Resp],
    limits: StreamLimits = StreamLimits(),
    connection: Connection | None = None,
) -> AsyncIterator[Resp]:
    """Yield an answer for every request, in completion order, within `limits`.

    `connection`: the stream's connection in frontends/unsent.py's ledger, which counts
    each answer's bytes until gRPC has taken it, or refuses an answer once ready (that
    request is then answered with the error; `handle` checks before a request runs).
    """
    window = _Window(limits)
    # Answers ready to send: (answer, its size, the id it frees ("" for none), what
    # gives its bytes back to the connection's ledger).
    ready: deque[tuple[Resp, int, str, Release | None]] = deque()
    wake = asyncio.Event()  # an answer is ready, or reading is over
    reading_over = False
    ids: set[str] = set()  # ids of requests in flight whose answer is not handed to gRPC yet
    tasks: set[asyncio.Task[None]] = set()

    def done(answer: Resp, frees: str, release: Release | None = None) -> None:
        size = protocol.size_of(answer)
        window.answer_bytes += size
        ready.append((answer, size, frees, release))
        wake.set()

    async def run(request: Req, request_id: str) -> None:
        answer = await protocol.handle(request)
        release = None
        if connection is not None:
            try:
                release = connection.hold(protocol.size_of(answer))
            except ResourceExhausted as e:
                answer = protocol.refuse(request, e)
        done(answer, request_id, release)

    async def read() -> None:
        nonlocal reading_over
        try:
            async for request in requests:
                window.requests += 1
                request_id = protocol.id_of(request)
                if request_id and request_id in ids:
                    done(protocol.refuse(request, InvalidArgument(_DUPLICATE)), "")
                else:
                    if request_id:
                        ids.add(request_id)
                    task = asyncio.create_task(run(request, request_id))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                # Not one more read at the limit: the client's window closes instead.
                await window.wait_for_room()
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            reading_over = True
            wake.set()

    reader = asyncio.create_task(read())
    sending: Release | None = None
    try:
        while True:
            while ready:
                answer, size, frees, sending = ready.popleft()
                if frees:
                    # Before the send: a client may reuse an id once it has the answer.
                    ids.discard(frees)
                yield answer  # resumes once gRPC has taken the answer
                window.sent(size)
                if sending is not None:
                    sending()
                    sending = None
            if reading_over:
                break
            wake.clear()
            await wake.wait()
        await reader  # re-raise a failure of the request stream itself
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        # The stream ended (or was cancelled) with answers not sent: they are freed.
        for release in [sending, *(item[3] for item in ready)]:
            if release is not None:
                release()
