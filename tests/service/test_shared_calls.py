"""Calls that overlap share one answer (service/engine/shared_calls.py): what keeps a
client calling Stats in a loop from queueing snapshots on the engine's loop."""

from __future__ import annotations

import asyncio

import pytest

from trtserve.service.engine.shared_calls import SharedCalls


class _Counted:
    """A call that takes until `release` is set, counting how often it ran."""

    def __init__(self) -> None:
        self.runs = 0
        self.release = asyncio.Event()

    async def __call__(self) -> object:
        self.runs += 1
        await self.release.wait()
        return object()


async def test_overlapping_calls_run_once_and_share_the_answer() -> None:
    shared: SharedCalls[object] = SharedCalls()
    call = _Counted()
    waiting = [asyncio.ensure_future(shared.run("all", call)) for _ in range(50)]
    await asyncio.sleep(0.01)
    call.release.set()
    answers = await asyncio.gather(*waiting)
    assert call.runs == 1
    assert all(a is answers[0] for a in answers)
    # Finished: the next call runs again.
    assert await shared.run("all", call) is not answers[0]
    assert call.runs == 2


async def test_calls_for_different_keys_run_apart() -> None:
    shared: SharedCalls[object] = SharedCalls()
    call = _Counted()
    waiting = [asyncio.ensure_future(shared.run(key, call)) for key in ("a", "b", "a", None)]
    await asyncio.sleep(0.01)
    call.release.set()
    a1, b, a2, everything = await asyncio.gather(*waiting)
    assert call.runs == 3
    assert a1 is a2 and len({id(a1), id(b), id(everything)}) == 3


async def test_a_caller_that_leaves_leaves_the_call_to_the_others() -> None:
    shared: SharedCalls[object] = SharedCalls()
    call = _Counted()
    leaving = asyncio.ensure_future(shared.run("all", call))
    staying = asyncio.ensure_future(shared.run("all", call))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.sleep(0.01)
    call.release.set()
    assert await staying is not None
    assert leaving.cancelled() and call.runs == 1


async def test_an_error_reaches_every_caller() -> None:
    shared: SharedCalls[object] = SharedCalls()
    started = asyncio.Event()

    async def failing() -> object:
        started.set()
        await asyncio.sleep(0.01)
        raise LookupError("no such model")

    waiting = [asyncio.ensure_future(shared.run("m", failing)) for _ in range(3)]
    await started.wait()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, LookupError) and str(r) == "no such model" for r in results)
    with pytest.raises(LookupError):  # not remembered: the next call runs again
        await shared.run("m", failing)
