"""The batcher's hot-path pieces: the timerfd timer, and arrivals joining a batch in place.

Both must leave behaviour as it was: the batches formed, and the queue limit
counting only requests that no forming batch can take.
"""

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from trtserve.client.timer import now
from trtserve.service.engine.batch import Request
from trtserve.service.engine.batcher import Batcher, BatchPolicy, PreciseTimer
from trtserve.service.engine.scheduler import Scheduler
from trtserve.service.errors import ResourceExhausted


async def test_timer_fires_after_its_time_and_not_when_disarmed():
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    timer = PreciseTimer.create(loop, fired.set)
    if timer is None:
        pytest.skip("no timerfd here; the batcher uses loop timers")
    try:
        start = now()
        timer.arm(start + 0.0005)
        await asyncio.wait_for(fired.wait(), timeout=10)
        assert now() >= start + 0.0005
        assert not timer.armed

        fired.clear()
        timer.arm(now() + 0.02)
        timer.disarm()
        await asyncio.sleep(0.1)
        assert not fired.is_set()
    finally:
        timer.close()


class Slot:
    available = True

    def accepts(self, shapes):
        return True


class Recorder:
    def __init__(self, workers=1, **policy):
        self.scheduler = Scheduler([Slot() for _ in range(workers)])
        self.batches = []
        self.queue_ahead = False  # a full batch never queues at a busy worker
        self.batcher = Batcher("m", BatchPolicy(**policy), self.scheduler, self)
        self.task = asyncio.create_task(self.batcher.run())

    def dispatch(self, worker, batch):
        self.batches.append([r.rows for r in batch.requests])
        for r in batch.requests:
            r.future.set_result({})

    def drop(self, request, reason):
        pass

    def hold_s(self, batch):
        return 0.0

    def may_queue(self, batch):
        return self.queue_ahead

    def submit(self, rows=1, width=4):
        loop = asyncio.get_running_loop()
        x = np.zeros((rows, width), np.float32)
        request = Request({"x": x}, rows, ((width,),), now(), None, loop.create_future())
        self.batcher.submit(request)
        return request

    async def settle(self):
        for _ in range(5):
            await asyncio.sleep(0)

    async def close(self):
        self.batcher.close()
        for i in range(len(self.scheduler._workers)):
            self.scheduler.release(i)
        self.batcher.wake()
        await asyncio.wait_for(self.task, 10)


async def test_arrivals_join_a_filling_batch_and_do_not_count_as_queued():
    h = Recorder(max_batch_size=8, max_queue_delay_s=60.0, max_queue_size=2)
    requests = []
    for _ in range(7):
        requests.append(h.submit())
        await h.settle()
    assert h.batches == [] and h.batcher.depth == 0  # all in the forming batch
    requests.append(h.submit())  # the eighth row fills it: it goes at once
    await asyncio.wait_for(asyncio.gather(*(r.future for r in requests)), 10)
    assert h.batches == [[1] * 8]
    await h.close()


async def test_a_request_that_cannot_join_sends_the_filling_batch():
    h = Recorder(max_batch_size=8, max_queue_delay_s=60.0)
    first = h.submit(rows=3)
    await h.settle()
    second = h.submit(rows=3, width=5)  # another shape: can never join
    await asyncio.wait_for(first.future, 10)
    assert h.batches == [[3]]  # the second now fills its own batch, for 60 s
    await h.close()  # closing sends it
    assert second.future.done() and h.batches == [[3], [3]]


async def test_a_batch_waiting_for_a_worker_takes_arrivals_until_one_frees():
    h = Recorder(workers=1, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=1)
    busy = h.scheduler.acquire({})  # the only worker is taken
    assert busy == 0
    requests = [h.submit()]
    for _ in range(3):
        await h.settle()
        requests.append(h.submit())
    await h.settle()
    assert h.batches == [] and h.batcher.depth == 0
    late = h.submit()  # the batch is full: this one queues
    with pytest.raises(ResourceExhausted):
        h.submit()
    h.scheduler.release(0)
    h.batcher.wake()
    await asyncio.wait_for(asyncio.gather(*(r.future for r in requests)), 10)
    assert h.batches[0] == [1, 1, 1, 1]
    h.scheduler.release(0)
    h.batcher.wake()
    await asyncio.wait_for(late.future, 10)
    await h.close()


async def test_a_lone_request_at_an_idle_batcher_is_dispatched_by_submit():
    h = Recorder(workers=1, max_batch_size=8, max_queue_delay_s=0.0)
    await h.settle()  # the batcher's task waits for a first request
    first = h.submit()
    # No loop iteration has passed: submit dispatched it (and the recorder answered it).
    assert h.batches == [[1]] and first.future.done()
    # The only worker is busy now: these queue, in order, for the batcher's task.
    second, third = h.submit(), h.submit()
    assert h.batches == [[1]]
    await h.settle()
    assert h.batches == [[1]] and not second.future.done()
    h.scheduler.release(0)
    h.batcher.worker_freed()
    await asyncio.wait_for(asyncio.gather(second.future, third.future), 10)
    assert h.batches == [[1], [1, 1]]
    await h.close()


async def test_with_a_delay_only_a_request_that_fills_a_batch_skips_the_task():
    h = Recorder(workers=1, max_batch_size=8, max_queue_delay_s=60.0)
    await h.settle()
    full = h.submit(rows=8)
    assert h.batches == [[8]] and full.future.done()
    h.scheduler.release(0)
    lone = h.submit(rows=1)  # waits out the delay for company
    await h.settle()
    assert h.batches == [[8]] and not lone.future.done()
    await h.close()
    assert h.batches == [[8], [1]]


async def test_a_request_past_its_deadline_on_arrival_is_left_to_the_task_to_drop():
    dropped = []
    scheduler = Scheduler([Slot()])
    batches = []
    batcher = Batcher("m", BatchPolicy(max_batch_size=8, max_queue_delay_s=0.0), scheduler,
                      SimpleNamespace(dispatch=lambda worker, batch: batches.append(batch),
                                      drop=lambda request, reason: dropped.append(reason),
                                      hold_s=lambda batch: 0.0,
                                      may_queue=lambda batch: False))
    task = asyncio.create_task(batcher.run())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    arrival = now()
    late = Request({"x": np.zeros((1, 4), np.float32)}, 1, ((4,),), arrival, arrival - 1.0,
                   loop.create_future())
    batcher.submit(late)
    for _ in range(5):
        await asyncio.sleep(0)
    assert batches == [] and dropped == ["deadline"]
    batcher.close()
    await asyncio.wait_for(task, 10)


def test_batch_delay_is_timed_by_the_timerfd_on_uvloop():
    """uvloop's loop clock counts whole milliseconds; the batcher must not use it.

    Timed on that clock, a 500 us delay lasted nearly a whole millisecond (measured:
    docs/benchmarks.md).
    Here: the batcher arms its timerfd with the batch's own deadline, on the
    serving clock, and never sends a batch before the delay.
    """
    uvloop = pytest.importorskip("uvloop")

    async def waits() -> tuple[list[float], list[float], list[float]]:
        h = Recorder(max_batch_size=8, max_queue_delay_s=0.0005)
        await h.settle()
        timer = h.batcher._timer
        if timer is None:
            pytest.skip("no timerfd here; the batcher uses loop timers")
        armed: list[float] = []
        arm = timer.arm
        timer.arm = lambda deadline: (armed.append(deadline), arm(deadline))[1]
        arrivals, waited = [], []
        for i in range(10):
            request = h.submit()
            arrivals.append(request.arrival)
            await asyncio.wait_for(request.future, 10)
            waited.append(now() - request.arrival)
            h.scheduler.release(0)  # the recorder's one worker is done with the batch
            await asyncio.sleep(0.0003 * (i % 4))  # arrivals at varied sub-ms phases
        await h.close()
        return arrivals, armed, waited

    arrivals, armed, waited = uvloop.run(waits())
    # Each arming is a batch's own deadline, exactly (a batch the task first sees
    # after its deadline, on a busy machine, goes without arming).
    assert armed and set(armed) <= {a + 0.0005 for a in arrivals}, (armed, arrivals)
    assert min(waited) >= 0.0005, waited  # never before the delay
