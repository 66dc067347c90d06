"""What one client process measures with: its window, its recorder, a precise sleeper,
and the open loop's arrival times."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Iterator
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


ARRIVALS = ("poisson", "even")


def arrivals(spacing: str, start: float, end: float, rate: float, seed: int = 0
             ) -> AsyncIterator[tuple[float, int]]:
    """The open loop's arrivals from `start` to `end`: `poisson` or `even` (see below)."""
    if spacing == "poisson":
        return poisson_arrivals(start, end, rate, seed)
    if spacing == "even":
        return even_arrivals(start, end, rate)
    raise ValueError(f"arrivals: got {spacing!r}, expected one of {ARRIVALS}")


def poisson_arrivals(start: float, end: float, rate: float, seed: int
                     ) -> AsyncIterator[tuple[float, int]]:
    """(due time, number) of each arrival of a Poisson process from `start` to `end`, when due.

    Arrivals that fall due together (the loop was busy) come back to back, each
    with its own due time, so the caller can count how late it sent them.
    """
    rng = random.Random(seed)
    gaps = (rng.expovariate(rate) for _ in itertools.count())
    return _when_due(itertools.accumulate(gaps, initial=start), end)


def even_arrivals(start: float, end: float, rate: float) -> AsyncIterator[tuple[float, int]]:
    """(due time, number) of arrivals exactly 1/rate apart from `start` to `end`, when due.

    Arrival i is due at start + i / rate (not a running sum, so the spacing does
    not drift); late ones come back to back, as with poisson_arrivals.
    """
    return _when_due((start + i / rate for i in itertools.count()), end)


async def _when_due(dues: Iterator[float], end: float) -> AsyncIterator[tuple[float, int]]:
    """Each due time before `end`, numbered, yielded once the loop's clock reaches it."""
    sleeper = Sleeper(asyncio.get_running_loop())
    try:
        for i, due in enumerate(dues):
            if due >= end:
                return
            while due > time.monotonic():  # a timer may fire a hair early
                await sleeper.until(due)
            yield due, i
    finally:
        sleeper.close()
