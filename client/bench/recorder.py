"""What one client process measures with: its window, its recorder, a precise sleeper."""

from __future__ import annotations

import asyncio
import os
import random
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Window:
    start: float  # time.monotonic(), shared by every process on the machine
    warm_end: float
    end: float

    def inside(self, t: float) -> bool:
        return self.warm_end <= t <= self.end


class Recorder:
    """What one process saw inside the window; progress goes to shared memory."""

    def __init__(self, window: Window, progress: Any, slot: int) -> None:
        self.window = window
        self.latencies = array("d")
        self.lags = array("d")
        self.errors: Counter[str] = Counter()
        self.dropped = 0
        self._progress = progress
        self._slot = slot
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None

    def done(self, due: float, finished: float, code: str | None) -> None:
        if not self.window.warm_end <= finished <= self.window.end:
            return
        if code is None:
            self.latencies.append(finished - due)
            self._progress[self._slot] += 1
        else:
            self.errors[code] += 1
            self._progress[self._slot + 1] += 1

    def mark_cpu(self, which: str) -> None:
        times = os.times()
        setattr(self, which, times.user + times.system)


class Sleeper:
    """Sleeps until a time on the loop's clock to the microsecond, where Linux allows.

    asyncio.sleep rounds up to whole milliseconds in epoll, which would show
    up as send lag (and latency, counted from the due time) in open loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from trtserve.client.timer import PreciseTimer

        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._timer = PreciseTimer.create(loop, self._fired)

    def _fired(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def until(self, when: float) -> None:
        if when <= self._loop.time():
            return
        if self._timer is None:
            await asyncio.sleep(when - self._loop.time())
            return
        self._waiter = self._loop.create_future()
        self._timer.arm(when)
        await self._waiter

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()


async def poisson_arrivals(window: Window, rate: float, seed: int
                           ) -> AsyncIterator[tuple[float, int]]:
    """(due time, number) of each arrival of a Poisson process over the window, when due.

    Arrivals that fall due together (the loop was busy) come back to back, each
    with its own due time, so the caller can count how late it sent them.
    """
    rng = random.Random(seed)
    sleeper = Sleeper(asyncio.get_running_loop())
    due, i = window.start, 0
    try:
        while due < window.end:
            now = time.monotonic()
            while due <= now and due < window.end:
                yield due, i
                i += 1
                due += rng.expovariate(rate)
            if due < window.end:
                await sleeper.until(due)
    finally:
        sleeper.close()
