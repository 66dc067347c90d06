"""Deadlines and cancellation: a request its client gave up on is never executed.

The double holds its first batch at a gate, so later requests wait in the
queue for as long as the test wants; the double counts the rows it executed.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from tests.doubles.controlled import ControlledBackend, Controls, controlled_model, expected
from tests.reliability.harness import model_stats, serve_controlled, wait_for
from trtserve.client import AsyncClient, Client, InferenceError
from trtserve.client.convert import infer_request
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.client.timer import now
from trtserve.service.errors import DeadlineExceeded


def rows(n: int, start: float) -> np.ndarray:
    return (start + np.arange(n * 8, dtype=np.float32)).reshape(n, 8)


@pytest.fixture
def served():
    # One worker taking one request per batch: a held batch blocks everything behind it.
    with serve_controlled(max_batch_size=4, max_rows_per_request=4) as s:
        yield s


def test_requests_whose_deadline_passes_in_the_queue_are_not_executed(served):
    served.controls.hold()
    first = rows(1, 0)

    async def scenario():
        async with AsyncClient(served.url) as c:
            blocker = asyncio.create_task(c.infer("controlled", {"x": first}, timeout=30))
            await asyncio.to_thread(served.controls.started.wait, 10)
            # Some wait in the batch being formed, the rest in the queue behind it.
            late = [c.infer("controlled", {"x": rows(3, 100 * (i + 1))}, timeout=0.2)
                    for i in range(6)]
            outcomes = await asyncio.gather(*late, return_exceptions=True)
            served.controls.release()
            return await blocker, outcomes

    out, outcomes = asyncio.run(scenario())
    np.testing.assert_array_equal(out["y"], expected(first))
    for outcome in outcomes:
        assert isinstance(outcome, InferenceError), outcome
        assert outcome.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # After the gate opens the batcher drops them: only the blocker's row ran.
    wait_for(lambda: model_stats(served.url).deadline_exceeded == 6,
             show=lambda: model_stats(served.url))
    executed, sizes = served.controls.snapshot()
    assert (executed, sizes) == (1, [1])
    stats = model_stats(served.url)
    assert stats.inferences == 1 and stats.batches == 1
    assert stats.cancelled == 0 and stats.errors == 0
    # The server goes on serving, and a deadline long enough is no problem.
    x = rows(2, 7)
    with Client(served.url) as c:
        np.testing.assert_array_equal(c.infer("controlled", {"x": x}, timeout=10)["y"],
                                      expected(x))


def test_a_cancelled_request_is_dropped_before_execution(served):
    served.controls.hold()

    async def scenario():
        async with AsyncClient(served.url) as c:
            blocker = asyncio.create_task(c.infer("controlled", {"x": rows(1, 0)}, timeout=30))
            await asyncio.to_thread(served.controls.started.wait, 10)
            stub = pb_grpc.InferenceServiceStub(c._channel)
            calls = [stub.Infer(infer_request("controlled", {"x": rows(2, 50 * i)}))
                     for i in range(3)]
            await asyncio.sleep(0.2)  # all three reach the server and wait
            for call in calls:
                call.cancel()
            for call in calls:
                with pytest.raises(asyncio.CancelledError):
                    await call
            await asyncio.to_thread(wait_for, lambda: model_stats(served.url).cancelled == 3)
            served.controls.release()
            await blocker

    asyncio.run(scenario())
    wait_for(lambda: model_stats(served.url).in_flight_batches == 0)
    assert served.controls.snapshot() == (1, [1])
    stats = model_stats(served.url)
    assert (stats.cancelled, stats.deadline_exceeded, stats.inferences) == (3, 0, 1)


def test_a_deadline_long_enough_is_met_and_not_counted_as_exceeded(served):
    x = rows(4, 3)
    with Client(served.url) as c:
        for _ in range(3):
            np.testing.assert_array_equal(c.infer("controlled", {"x": x}, timeout=5)["y"],
                                          expected(x))
    stats = model_stats(served.url)
    assert (stats.deadline_exceeded, stats.cancelled, stats.inferences) == (0, 0, 12)


def test_a_deadline_is_counted_once_when_the_cancellation_overtakes_the_drop():
    """The batcher drops a request whose deadline passed; grpc.aio cancels its handler
    for the same deadline before the handler sees the drop (a race CI once hit)."""
    controls = Controls()
    runtime = ControlledBackend(controls).runtime(controlled_model(max_batch_size=4))

    async def scenario() -> BaseException | None:
        await runtime.start()
        try:
            controls.hold()
            blocker = asyncio.create_task(runtime.infer({"x": rows(1, 0)}))
            await asyncio.to_thread(controls.started.wait, 10)
            late = asyncio.create_task(runtime.infer({"x": rows(1, 9)}, deadline=now() + 0.05))
            await asyncio.sleep(0.1)  # past its deadline, waiting for the held worker
            batcher = runtime._batcher
            assert batcher is not None
            waiting = [*batcher._pending, *(batcher._forming.requests if batcher._forming
                                            else [])]
            (request,) = waiting
            controls.release()
            while not request.future.done():  # the batcher drops it ...
                await asyncio.sleep(0)
            late.cancel()  # ... and the cancellation reaches the handler first
            with pytest.raises(asyncio.CancelledError):
                await late
            await blocker
            return request.future.exception()
        finally:
            await runtime.stop()

    dropped_with = asyncio.run(scenario())
    assert isinstance(dropped_with, DeadlineExceeded)  # the drop came first
    assert runtime.counters.deadline_exceeded == 1
    assert (runtime.counters.cancelled, controls.snapshot()) == (0, (1, [1]))
