"""The load generators (client/bench/load.py, recorder.py) against a trivial async target.

The target (tests/doubles/unary_call.py) stands in for a gRPC unary call; it holds its
answers until the test's condition is met, so nothing here waits on the clock: the
open loop's arrivals are all due already (their window is in the past), and the closed
loop is stopped by cancelling it once the target has seen what it should.
"""

import asyncio
import itertools
import time

import pytest

from tests.doubles.unary_call import HANG_GUARD_S, UnaryCallDouble, until
from trtserve.client.bench.load import closed_loop, open_loop
from trtserve.client.bench.recorder import (
    Recorder,
    Window,
    arrivals,
    even_arrivals,
    poisson_arrivals,
)


def _recorder(start: float, end: float) -> Recorder:
    return Recorder(Window(start, start, end), [0, 0], 0)


async def _collect(due_times) -> list[tuple[float, int]]:
    return [item async for item in due_times]


# --- arrivals ------------------------------------------------------------------------------


async def test_even_arrivals_are_exactly_one_over_the_rate_apart_and_stop_before_the_end():
    start = time.monotonic() - 10.0  # all due already: nothing sleeps
    got = await _collect(even_arrivals(start, start + 0.2, 50.0))
    assert [i for _, i in got] == list(range(10))
    assert [due for due, _ in got] == [start + i / 50.0 for i in range(10)]


async def test_poisson_arrivals_follow_the_seed_inside_the_window():
    start = time.monotonic() - 10.0
    first = await _collect(poisson_arrivals(start, start + 1.0, 200.0, seed=7))
    again = await _collect(poisson_arrivals(start, start + 1.0, 200.0, seed=7))
    other = await _collect(poisson_arrivals(start, start + 1.0, 200.0, seed=8))
    assert first == again and first != other
    dues = [due for due, _ in first]
    assert dues[0] == start and dues == sorted(dues) and dues[-1] < start + 1.0
    # Not evenly spaced: the gaps of a Poisson process differ.
    assert len({round(b - a, 9) for a, b in itertools.pairwise(dues)}) > 1


async def test_arrivals_picks_the_spacing_by_name_and_names_a_wrong_one():
    start = time.monotonic() - 10.0
    assert await _collect(arrivals("even", start, start + 0.1, 30.0)) == \
        await _collect(even_arrivals(start, start + 0.1, 30.0))
    assert await _collect(arrivals("poisson", start, start + 0.1, 30.0, seed=3)) == \
        await _collect(poisson_arrivals(start, start + 0.1, 30.0, seed=3))
    with pytest.raises(ValueError, match="arrivals: got 'uniform'"):
        arrivals("uniform", start, start + 0.1, 30.0)


# --- open loop -----------------------------------------------------------------------------


async def test_open_loop_without_a_cap_sends_every_arrival_while_none_is_answered():
    start = time.monotonic() - 10.0
    # The target answers only once all 40 are in flight at once: a loop that waited
    # for answers, or held any arrival back, would never get there.
    target = UnaryCallDouble(release_at_in_flight=40)
    rec = _recorder(start, time.monotonic() + 60.0)
    payloads = [b"a", b"b", b"c"]
    await asyncio.wait_for(
        open_loop(target, payloads, even_arrivals(start, start + 0.4, 100.0), rec, 1.0,
                  max_outstanding=None), HANG_GUARD_S)
    assert target.peak == 40 and len(target.calls) == 40
    assert target.calls == [payloads[i % 3] for i in range(40)]
    assert rec.dropped == 0 and len(rec.lags) == 40 and len(rec.latencies) == 40
    # Latency counts from the due time (10 s ago), not from the send.
    assert min(rec.latencies) >= 9.6 and min(rec.lags) >= 9.6


async def test_open_loop_with_a_cap_drops_what_finds_it_full():
    start = time.monotonic() - 10.0
    target = UnaryCallDouble(release_at_in_flight=5)
    rec = _recorder(start, time.monotonic() + 60.0)
    await asyncio.wait_for(
        open_loop(target, [b"x"], even_arrivals(start, start + 0.4, 100.0), rec, 1.0,
                  max_outstanding=5), HANG_GUARD_S)
    # All 40 fell due at once, before any request could start: 5 sent, 35 dropped.
    assert target.peak == 5 and len(target.calls) == 5
    assert rec.dropped == 35 and len(rec.latencies) == 5


async def test_open_loop_counts_errors_by_status():
    start = time.monotonic() - 10.0
    target = UnaryCallDouble(fail_payloads=frozenset({b"bad"}))
    rec = _recorder(start, time.monotonic() + 60.0)
    await asyncio.wait_for(
        open_loop(target, [b"ok", b"bad"], even_arrivals(start, start + 0.1, 100.0), rec, 1.0),
        HANG_GUARD_S)
    assert rec.errors == {"UNAVAILABLE": 5} and len(rec.latencies) == 5


# --- closed loop ---------------------------------------------------------------------------


async def test_closed_loop_keeps_exactly_concurrency_requests_in_flight():
    now = time.monotonic()
    target = UnaryCallDouble(release_at_in_flight=4, fail_payloads=frozenset({b"p1"}))
    rec = _recorder(now - 1.0, now + 600.0)
    payloads = [b"p0", b"p1", b"p2"]
    loop = asyncio.create_task(closed_loop(target, payloads, 4, rec, 1.0, first=1))

    await until(lambda: len(target.calls) >= 40)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    # No more than 4 at once, and all 4 at once (the first answers waited for that).
    assert target.peak == 4
    # Stream k starts at payload first + k and moves on one payload per request.
    assert sorted(target.calls[:4]) == sorted([b"p1", b"p2", b"p0", b"p1"])
    answered = len(rec.latencies) + sum(rec.errors.values())
    assert answered >= 40 - 4 and set(rec.errors) == {"UNAVAILABLE"}
    assert rec.errors["UNAVAILABLE"] == target.calls[:answered].count(b"p1")


# --- several connections -------------------------------------------------------------------


async def test_open_loop_over_several_calls_takes_them_in_turn():
    start = time.monotonic() - 10.0
    targets = [UnaryCallDouble(), UnaryCallDouble(), UnaryCallDouble()]
    rec = _recorder(start, time.monotonic() + 60.0)
    await asyncio.wait_for(
        open_loop(targets, [b"x"], even_arrivals(start, start + 0.3, 100.0), rec, 1.0),
        HANG_GUARD_S)
    assert [len(t.calls) for t in targets] == [10, 10, 10]


async def test_closed_loop_over_several_calls_gives_each_its_share_of_the_streams():
    now = time.monotonic()
    # Each target answers only once its own share (3 of 6 streams) is in flight on it.
    targets = [UnaryCallDouble(release_at_in_flight=3), UnaryCallDouble(release_at_in_flight=3)]
    rec = _recorder(now - 1.0, now + 600.0)
    loop = asyncio.create_task(closed_loop(targets, [b"p"], 6, rec, 1.0))

    await until(lambda: min(len(t.calls) for t in targets) >= 30)
    loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await loop
    assert [t.peak for t in targets] == [3, 3]
