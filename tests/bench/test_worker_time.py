"""benchmarks.worker_time's clocks on real workers (the controlled double's model, its
batches on the workers' threads); the served GPU runs need a GPU (docs/gpu.md)."""

from __future__ import annotations

import asyncio

import numpy as np

from benchmarks.worker_time import STAGES, WorkerClock
from tests.doubles.controlled import (
    INPUT,
    OUTPUT,
    WIDTH,
    ControlledBackend,
    Controls,
    controlled_model,
    expected,
)
from trtserve.service.engine import worker


async def test_the_clock_times_every_batch_and_puts_the_workers_methods_back():
    methods = (worker.Worker._run, worker.Worker.submit, worker._execute, worker.Worker._report)
    controls = Controls(any_thread=False, sleep_s=0.002)  # 2 ms a batch, on the thread
    runtime = ControlledBackend(controls).runtime(controlled_model(
        workers=2, max_batch_size=4, max_queue_delay_us=0, inline_below_us=0))
    clock = WorkerClock()
    with clock.installed():
        await runtime.start()
        try:
            inputs = [np.full((1, WIDTH), i, np.float32) for i in range(12)]
            answers = await asyncio.gather(*(runtime.infer({INPUT: x}) for x in inputs))
        finally:
            await runtime.stop()
    assert (worker.Worker._run, worker.Worker.submit, worker._execute,
            worker.Worker._report) == methods
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_array_equal(answer[OUTPUT], expected(x))

    times = clock.per_batch_us()
    assert times["rows"] == 12
    assert 3 <= times["batches"] <= 12  # batches of up to 4 rows
    assert set(STAGES) <= times.keys()
    # The executor's run sleeps 2 ms: within the turn, and wall time, not CPU time.
    assert 2000 <= times["exec"] <= times["turn"]
    assert times["exec_cpu"] < times["exec"] / 2
    assert times["inbox"] >= 0 and times["settle"] > 0

    clock.reset()
    assert clock.per_batch_us()["batches"] == 0
