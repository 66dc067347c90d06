"""A double of a gRPC unary call, for the load generators' unit tests (tests/bench/)."""

import asyncio
from collections.abc import Callable

import grpc

HANG_GUARD_S = 30.0  # a broken loop fails the test instead of hanging it


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition()` holds (TimeoutError after HANG_GUARD_S)."""

    async def wait() -> None:
        while not condition():
            await asyncio.sleep(0)

    await asyncio.wait_for(wait(), HANG_GUARD_S)


class UnaryCallDouble:
    """A DOUBLE of a grpc.aio unary call (`await call(payload, timeout=, metadata=)`):
    counts calls and how many are in flight; answers once `release_at_in_flight` calls
    are in flight at the same time (at once without it); fails the payloads in
    `fail_payloads` with UNAVAILABLE, as the real call raises AioRpcError."""

    def __init__(self, release_at_in_flight: int | None = None,
                 fail_payloads: frozenset[bytes] = frozenset()) -> None:
        self.calls: list[bytes] = []
        self.in_flight = 0
        self.peak = 0
        self.release = asyncio.Event()
        self._release_at = release_at_in_flight
        self._fail = fail_payloads
        if release_at_in_flight is None:
            self.release.set()

    async def __call__(self, payload: bytes, timeout: float, metadata: object) -> bytes:
        self.calls.append(payload)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        if self._release_at is not None and self.in_flight >= self._release_at:
            self.release.set()
        try:
            await self.release.wait()
            await asyncio.sleep(0)  # let every other stream run between answers
        finally:
            self.in_flight -= 1
        if payload in self._fail:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "refused")
        return b""
