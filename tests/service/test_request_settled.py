"""A queued request settles its submitter at once, exactly once (Request.on_settled).

The engine process's requests (ModelRuntime.submit) are told their outcome from
where they are answered, failed or cancelled, with no done callback of their
future (a loop callback per request on the engine's busiest thread).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from trtserve.service.engine.batch import Request
from trtserve.service.errors import DeadlineExceeded


def _request(seen: list[tuple[str, Request]]) -> Request:
    def settled(request: Request) -> None:
        future = request.future
        seen.append(("cancelled" if future.cancelled() else
                     "failed" if future.exception() else "answered", request))

    return Request({"x": np.zeros((1, 4), np.float32)}, 1, ((4,),), 0.0, None,
                   asyncio.get_running_loop().create_future(), on_settled=settled)


@pytest.mark.parametrize("how", ["answered", "failed", "cancelled"])
async def test_settled_at_once_and_only_once(how: str) -> None:
    seen: list[tuple[str, Request]] = []
    request = _request(seen)
    outputs = {"y": np.ones((1, 4), np.float32)}
    ends = {"answered": lambda: request.answer(outputs),
            "failed": lambda: request.fail(DeadlineExceeded("late")),
            "cancelled": request.cancel}
    ends[how]()
    assert seen == [(how, request)]  # before the loop ran anything else
    for end in ends.values():  # whatever comes later finds it settled
        end()
    await asyncio.sleep(0)
    assert seen == [(how, request)]
    if how == "answered":
        assert request.future.result() is outputs


async def test_a_request_without_a_submitter_settles_nobody() -> None:
    request = Request({}, 1, (), 0.0, None, asyncio.get_running_loop().create_future())
    request.answer({})
    assert request.future.done() and request.on_settled is None


async def test_a_submitter_that_raises_does_not_stop_the_answers(
        caplog: pytest.LogCaptureFixture) -> None:
    """Answers settle inside the batch's completion: one submitter's failure is logged,
    and the requests after it in the batch are still answered and settled."""
    seen: list[tuple[str, Request]] = []
    first, second = _request(seen), _request(seen)

    def broken(request: Request) -> None:
        raise RuntimeError("submitter bug")

    first.on_settled = broken
    for request in (first, second):
        request.answer({"y": np.ones((1, 4), np.float32)})
    assert first.future.done() and seen == [("answered", second)]
    assert "settling a request failed" in caplog.text
