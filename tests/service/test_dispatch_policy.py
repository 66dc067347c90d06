"""The dispatch policy (ModelRuntime as the batcher's Dispatcher) on a controlled clock,
and what it does with a batch that comes back: split, answered, or failed.

The model's clock (`model.now`) is the test's: what a batch is held for is
computed, not raced. Batches run on the controlled double, held at its gate
where a batch must stay in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.doubles.controlled import (
    INPUT,
    OUTPUT,
    SECRET,
    WIDTH,
    ControlledBackend,
    Controls,
    controlled_model,
    expected,
)
from trtserve.service.engine import model
from trtserve.service.engine.batch import Batch, Request
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.errors import BackendError

START = 1000.0


class Clock:
    def __init__(self) -> None:
        self.t = START

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def served(monkeypatch) -> AsyncIterator[tuple[ModelRuntime, Controls, Clock]]:
    clock = Clock()
    monkeypatch.setattr(model, "now", clock)
    # Thread-bound executors (as TensorRT's): a quick batch is handed to a worker, not
    # run on the loop, so it can be held in flight. Every measured batch counts as quick.
    controls = Controls(any_thread=False)
    runtime = ControlledBackend(controls).runtime(controlled_model(
        workers=2, max_batch_size=8, max_queue_delay_us=0, inline_below_us=10**6))
    await runtime.start()
    try:
        yield runtime, controls, clock
    finally:
        controls.release()
        await runtime.stop()


def _x(rows: int) -> np.ndarray:
    return np.zeros((rows, WIDTH), np.float32)


def _batch(rows: int) -> Batch:
    batch = Batch()
    batch.add(Request({INPUT: _x(rows)}, rows, ((WIDTH,),), START, None,
                      asyncio.get_running_loop().create_future()))
    return batch


async def _in_flight(runtime: ModelRuntime, controls: Controls, rows: int) -> asyncio.Task:
    """A batch of `rows` dispatched now (on the test's clock) and held at the gate."""
    controls.hold()
    task = asyncio.create_task(runtime.infer({INPUT: _x(rows)}))
    assert await asyncio.to_thread(controls.started.wait, 10)
    return task


async def test_a_batch_never_measured_is_not_held(served):
    runtime, _, _ = served
    assert runtime.hold_s(_batch(1)) == 0.0


async def test_a_quick_batch_waits_for_the_quick_batch_in_flight_until_it_has_stalled(served):
    runtime, controls, clock = served
    await runtime.infer({INPUT: _x(1)})  # measured: 1-row batches are quick
    assert runtime.hold_s(_batch(1)) == 0.0  # nothing in flight: nothing to wait for
    first = await _in_flight(runtime, controls, 1)
    clock.t = START + 0.002
    assert runtime.hold_s(_batch(1)) == pytest.approx(model.QUICK_HOLD_S - 0.002)
    clock.t = START + model.QUICK_HOLD_S  # the batch in flight has stalled
    assert runtime.hold_s(_batch(1)) == 0.0
    controls.release()
    await first
    clock.t = START + 0.001  # nothing in flight any more
    assert runtime.hold_s(_batch(1)) == 0.0


async def test_a_full_quick_batch_does_not_wait_for_the_quick_batch_in_flight(served):
    """Before, it waited like any quick batch: with requests of 8 rows and batches of 64,
    one batch at a time ran and the other workers sat idle (session 10, H100 host)."""
    runtime, controls, clock = served
    await runtime.infer({INPUT: _x(1)})
    await runtime.infer({INPUT: _x(8)})  # measured: 1- and 8-row (full) batches are quick
    first = await _in_flight(runtime, controls, 1)
    clock.t = START + 0.001
    assert runtime.hold_s(_batch(1)) > 0  # it can still grow: it waits
    assert runtime.hold_s(_batch(8)) == 0.0  # full (max_batch_size 8): it goes
    controls.release()
    await first


async def test_behind_a_slow_batch_a_quick_batch_does_not_wait(served):
    runtime, controls, _ = served
    await runtime.infer({INPUT: _x(1)})  # 1 row: quick; 3 rows: never measured, slow
    slow = await _in_flight(runtime, controls, 3)
    assert runtime.hold_s(_batch(1)) == 0.0
    controls.release()
    await slow


async def test_a_batch_is_split_back_into_each_requests_rows_in_order():
    loop = asyncio.get_running_loop()
    batch = Batch()
    for rows in (2, 1, 3):
        batch.add(Request({INPUT: _x(rows)}, rows, ((WIDTH,),), START, None,
                          loop.create_future()))
    y = np.arange(6 * 2).reshape(6, 2)
    parts = list(batch.split({"y": y}, batching=True))
    assert [r.rows for r, _ in parts] == [2, 1, 3]
    assert [out["y"][:, 0].tolist() for _, out in parts] == [[0, 2], [4], [6, 8, 10]]
    assert all(np.shares_memory(out["y"], y) for _, out in parts)  # views, not copies
    # A model that does not batch: one request per batch, its outputs as produced.
    alone = Batch()
    alone.add(batch.requests[0])
    ((request, out),) = alone.split({"y": y}, batching=False)
    assert request is batch.requests[0] and out["y"] is y


async def test_a_request_keeps_its_first_answer():
    request = _batch(1).requests[0]
    request.answer({"y": _x(1)})
    request.fail(RuntimeError("late"))  # a second completion changes nothing
    request.answer({})
    assert request.answered and list(request.future.result()) == ["y"]


async def test_a_failed_batch_fails_its_requests_alone_and_a_worker_failing_again_leaves(served):
    runtime, controls, _ = served
    # Only the failed batch's request fails; the message names the batch, not the
    # exception's text (that stays in the log).
    controls.fail_next_batches(1)
    with pytest.raises(BackendError) as failed:
        await runtime.infer({INPUT: _x(2)})
    assert "the batch of 2 rows was not completed" in str(failed.value)
    assert SECRET not in str(failed.value)
    assert runtime.counters.errors == 1
    assert [s.last_error for s in runtime.worker_stats if s.errors] == [
        "InjectedFailure on a batch of 2 rows; see the server log"]
    await runtime.infer({INPUT: _x(2)})  # the next batch is served
    assert runtime.healthy_workers == 2
    # max_worker_failures (3) failures in a row on one worker take it out of the rotation,
    # and only that worker.
    for _ in range(6):
        controls.fail_next_batches(1)
        with pytest.raises(BackendError):
            await runtime.infer({INPUT: _x(1)})
        if runtime.healthy_workers < 2:
            break
    (out,) = [i for i, w in enumerate(runtime.workers) if not w.healthy]
    assert runtime.worker_stats[out].last_error.startswith(
        "out of the rotation: 3 consecutive failures, the last InjectedFailure")
    await runtime.infer({INPUT: _x(1)})  # the other worker serves on


@pytest.fixture
async def one_worker(monkeypatch) -> AsyncIterator[tuple[ModelRuntime, Controls]]:
    """One thread-bound worker, batches of at most 8 rows, none held back by the delay."""
    controls = Controls(any_thread=False, keep_values=True)
    runtime = ControlledBackend(controls).runtime(controlled_model(
        workers=1, max_batch_size=8, max_queue_delay_us=0, inline_below_us=10**6))
    await runtime.start()
    try:
        yield runtime, controls
    finally:
        controls.release()
        await runtime.stop()


async def _until(condition, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"timed out waiting until {what}")


async def test_a_full_batch_queues_behind_the_busy_worker_and_each_request_gets_its_rows(
        one_worker):
    runtime, controls = one_worker
    await runtime.infer({INPUT: _x(8)})  # measured: a full batch runs short
    controls.hold()
    xs = [np.full((8, WIDTH), i, np.float32) for i in range(3)]
    tasks = [asyncio.create_task(runtime.infer({INPUT: x})) for x in xs]
    await _until(lambda: runtime.in_flight == 2, "one batch runs, one waits at the worker")
    await asyncio.sleep(0.02)
    assert runtime.snapshot().workers[0].in_flight == 2  # the third waits in the batcher
    controls.release()
    answers = await asyncio.gather(*tasks)
    for x, answer in zip(xs, answers, strict=True):
        np.testing.assert_array_equal(answer[OUTPUT], expected(x))
    assert runtime.in_flight == 0
    assert controls.snapshot()[1] == [8, 8, 8, 8]


async def test_a_batch_that_could_still_grow_or_runs_long_does_not_queue_at_the_worker(
        one_worker):
    runtime, controls = one_worker
    controls.hold()
    first = asyncio.create_task(runtime.infer({INPUT: _x(8)}))  # 8 rows never measured
    await _until(lambda: runtime.in_flight == 1, "the first batch runs")
    second = asyncio.create_task(runtime.infer({INPUT: _x(8)}))
    await asyncio.sleep(0.02)
    assert runtime.in_flight == 1  # not known to run short: it waits in the batcher
    controls.release()
    await asyncio.gather(first, second)
    await runtime.infer({INPUT: _x(2)})  # measured: 2 rows run short
    controls.hold()
    first = asyncio.create_task(runtime.infer({INPUT: _x(8)}))
    await _until(lambda: runtime.in_flight == 1, "the first batch runs")
    small = asyncio.create_task(runtime.infer({INPUT: _x(2)}))
    await asyncio.sleep(0.02)
    assert runtime.in_flight == 1  # 2 of 8 rows: it may grow while it waits
    controls.release()
    await asyncio.gather(first, small)


async def test_a_batch_queued_behind_a_failure_that_took_the_worker_out_fails_once(
        one_worker, caplog):
    runtime, controls = one_worker
    await runtime.infer({INPUT: _x(8)})
    controls.hold()
    first = asyncio.create_task(runtime.infer({INPUT: _x(8)}))
    await _until(lambda: runtime.in_flight == 1, "the first batch runs")
    second = asyncio.create_task(runtime.infer({INPUT: _x(8)}))
    await _until(lambda: runtime.in_flight == 2, "the second waits at the worker")
    # The first batch fails and so does every rebuild: the worker leaves the rotation,
    # and the batch queued behind it finds no executor.
    controls.fail_next_batches(1)
    controls.fail_next_builds(10)
    controls.release()
    for task in (first, second):
        with pytest.raises(BackendError):
            await task
    assert runtime.healthy_workers == 0
    taken_out = [r for r in caplog.records if "taken out of the rotation" in r.getMessage()]
    assert len(taken_out) == 1
    assert runtime.worker_stats[0].state == "backing_off"
