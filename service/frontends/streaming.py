"""Bidirectional inference streams: many requests in flight, answers as they finish."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

Req = TypeVar("Req")
Resp = TypeVar("Resp")


async def answer_stream(
    requests: AsyncIterator[Req],
    handle: Callable[[Req], Awaitable[Resp]],
    max_in_flight: int = 1024,
) -> AsyncIterator[Resp]:
    """Yield handle(r) for every r, in completion order.

    `handle` must turn its own failures into a response (the stream carries
    errors per request and stays open). At most `max_in_flight` requests of one
    stream are outstanding, so a fast sender cannot queue unbounded work.
    """
    answers: asyncio.Queue[Resp | None] = asyncio.Queue()
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one(request: Req) -> None:
        try:
            answers.put_nowait(await handle(request))
        finally:
            slots.release()

    async def read() -> None:
        try:
            async for request in requests:
                await slots.acquire()
                task = asyncio.create_task(one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            answers.put_nowait(None)

    reader = asyncio.create_task(read())
    try:
        while (answer := await answers.get()) is not None:
            yield answer
        await reader  # re-raise a failure of the request stream itself
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
