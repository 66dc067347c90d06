"""A stream's utilization over the stats window (service/engine/stats.py, BusyWindow).

Reading it must give what summing every interval's part inside the window gives,
while touching only the few intervals at the window's start: Stats and metrics
read it on the engine's loop, and a busy worker adds thousands a second.
"""

from __future__ import annotations

import random

import pytest

from trtserve.service.engine.stats import BusyWindow


def _summed(intervals: list[tuple[float, float]], now: float, since: float,
            window_s: float) -> float:
    """Every interval's part inside the window, summed: the definition."""
    window = min(window_s, max(now - since, 1e-9))
    start = now - window
    busy = sum(min(end, now) - max(begin, start) for begin, end in intervals
               if end > start)
    return min(busy / window, 1.0)


@pytest.mark.parametrize("seed", range(20))
def test_utilization_is_the_busy_time_inside_the_window(seed: int) -> None:
    rng = random.Random(seed)
    window_s = rng.choice([0.05, 0.5, 2.0])
    busy = BusyWindow(window_s)
    added: list[tuple[float, float]] = []
    since = now = 100.0
    for _ in range(3000):
        now += rng.expovariate(2000.0)  # ends in order, some close together
        length = rng.choice([rng.uniform(0.0, 0.002), rng.uniform(0.0, 0.03)])
        busy.add(now, length)
        added.append((now - length, now))
        if rng.random() < 0.05:  # a read, on the same clock: at or after the last end
            now += rng.choice([0.0, rng.uniform(0.0, 0.1)])
            since_read = rng.choice([since, now - rng.uniform(0.0, window_s)])
            got, window = busy.utilization(now, since_read)
            assert got == pytest.approx(_summed(added, now, since_read, window_s), abs=1e-9)
            assert window == pytest.approx(min(window_s, max(now - since_read, 1e-9)))


def test_a_read_touches_the_intervals_at_the_windows_start_not_all_of_them() -> None:
    busy = BusyWindow(60.0)
    for i in range(100_000):
        busy.add(1.0 + i * 1e-4, 5e-5)  # 10 thousand a second, half busy

    class Counting(list):  # type: ignore[type-arg]
        """The window's intervals, counting how many a read looks at."""

        looked = 0

        def __iter__(self):  # type: ignore[no-untyped-def]
            for item in super().__iter__():
                Counting.looked += 1
                yield item

    busy._intervals = Counting(busy._intervals)  # type: ignore[assignment]
    now = 1.0 + 100_000 * 1e-4
    got, _ = busy.utilization(now, since=1.0)  # a 10 s window: the intervals half busy
    assert got == pytest.approx(0.5, rel=1e-3)
    assert Counting.looked < 10
