"""memory.Trimmer: one trim per burst of large requests, and the follow-up a frontend
process asks for (its answers are freed after the burst's trim, once clients read them).

Real malloc_trim calls in this process (glibc); elsewhere the trimmer does nothing."""

from __future__ import annotations

import asyncio

import pytest

from tests.doubles.unary_call import until
from trtserve.service.memory import TRIM_DELAY_S, Trimmer

FOLLOW_UP_S = 0.2


@pytest.fixture
def trimmer():
    trimmer = Trimmer(follow_up_s=FOLLOW_UP_S)
    if not trimmer.available:
        pytest.skip("malloc_trim is glibc's")
    yield trimmer
    trimmer.close()


async def test_a_burst_is_trimmed_once_then_followed_up_once(trimmer: Trimmer) -> None:
    for _ in range(5):  # a burst: each request pushes its trim back
        trimmer.request()
        await asyncio.sleep(TRIM_DELAY_S / 10)
    await until(lambda: trimmer.trims == 1)
    await until(lambda: trimmer.trims == 2)  # the follow-up
    await asyncio.sleep(3 * FOLLOW_UP_S)
    assert trimmer.trims == 2  # and no more: a follow-up is not followed up


async def test_a_request_before_the_follow_up_starts_a_new_burst(trimmer: Trimmer) -> None:
    trimmer.request()
    await until(lambda: trimmer.trims == 1)
    await asyncio.sleep(FOLLOW_UP_S / 4)
    trimmer.request()  # the follow-up to come gives way to this burst's trim and its own
    await until(lambda: trimmer.trims == 2)
    await until(lambda: trimmer.trims == 3)
    await asyncio.sleep(3 * FOLLOW_UP_S)
    assert trimmer.trims == 3


async def test_without_a_follow_up_a_burst_is_trimmed_once() -> None:
    trimmer = Trimmer()
    if not trimmer.available:
        pytest.skip("malloc_trim is glibc's")
    trimmer.request()
    await until(lambda: trimmer.trims == 1)
    await asyncio.sleep(0.3)
    assert trimmer.trims == 1
    trimmer.close()


async def test_close_cancels_the_follow_up(trimmer: Trimmer) -> None:
    trimmer.request()
    await until(lambda: trimmer.trims == 1)
    trimmer.close()
    await asyncio.sleep(2 * FOLLOW_UP_S)
    assert trimmer.trims == 1
