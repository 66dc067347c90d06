"""Calls that overlap share one answer: the guard on Stats against clients that flood it.

A Stats answer is a snapshot of every worker's counters and percentiles, read on the
engine's loop. Before this, each call read its own: 256 clients calling Stats in a loop
queued hundreds of snapshots there, ahead of every frontend's requests, and held a client
sending one Infer at a time to 2-6 calls/s (docs/reliability.md, "Stats under a
flood"). Shared, a flood costs the engine at most one snapshot at a time per owner of
one of these (each frontend, and the engine itself), whatever the number of clients.

A caller that joins a call already running gets its answer: in the engine's process, a
snapshot read after the caller came; in a frontend, one read at most a round trip to
the engine before it came.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedCalls(Generic[T]):
    """`run(key, call)`: await `call()`, or the same call for `key` already running.

    Owned by one event loop. A caller that is cancelled leaves the call running for the
    others (it is shielded); its result or error goes to every caller waiting."""

    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(call())
            self._running[key] = future
            future.add_done_callback(lambda f: self._finished(key, f))
        return await asyncio.shield(future)

    def _finished(self, key: Hashable, future: asyncio.Future[T]) -> None:
        if self._running.get(key) is future:
            del self._running[key]
        if not future.cancelled():
            future.exception()  # seen, even when every caller has left
