"""The batcher on a real event loop, with stand-in workers that only record batches."""

import asyncio

import numpy as np
import pytest

from trtserve.client.timer import now
from trtserve.service.engine.batch import Request
from trtserve.service.engine.batcher import Batcher, BatchPolicy
from trtserve.service.engine.scheduler import Scheduler
from trtserve.service.errors import ResourceExhausted, Unavailable


class Slot:
    available = True

    def accepts(self, shapes):
        return True


class Harness:
    """A batcher whose dispatched batches are recorded; workers freed by hand."""

    def __init__(self, workers=1, queue_ahead=False, hold_s=0.0, **policy):
        policy.setdefault("max_queue_delay_s", 60.0)
        # What the model's may_queue answers: may a batch that cannot grow queue at a
        # busy worker? And its hold_s: how long any batch waits for a busy worker.
        self.queue_ahead = queue_ahead
        self.hold = hold_s
        self.scheduler = Scheduler([Slot() for _ in range(workers)])
        self.batches = []  # (worker, [rows per request])
        self.dropped = []
        self.batcher = Batcher("m", BatchPolicy(**policy), self.scheduler, self)
        self.task = asyncio.create_task(self.batcher.run())
        self.dispatched = asyncio.Event()

    # The batcher's Dispatcher: records batches, answers them, holds them `hold_s`.
    def dispatch(self, worker, batch):
        self.batches.append((worker, [r.rows for r in batch.requests]))
        for r in batch.requests:
            r.future.set_result({})
        self.dispatched.set()

    def drop(self, request, reason):
        self.dropped.append(reason)

    def hold_s(self, batch):
        return self.hold

    def may_queue(self, batch):
        return self.queue_ahead

    def submit(self, rows=1, width=4, deadline=None, arrival=None):
        loop = asyncio.get_running_loop()
        x = np.zeros((rows, width), np.float32)
        arrival = now() if arrival is None else arrival
        r = Request({"x": x}, rows, ((width,),), arrival, deadline, loop.create_future())
        self.batcher.submit(r)
        return r

    def free(self, worker):
        self.scheduler.release(worker)
        self.batcher.wake()

    async def settle(self):
        for _ in range(5):
            await asyncio.sleep(0)

    async def close(self):
        """Close, freeing workers until everything queued has been dispatched."""
        self.batcher.close()
        for _ in range(100):
            if self.task.done():
                break
            for worker in range(len(self.scheduler._workers)):
                self.free(worker)
            await asyncio.sleep(0.01)
        await asyncio.wait_for(self.task, 5)


async def test_full_batch_goes_without_waiting_out_the_delay():
    h = Harness(max_batch_size=4, max_queue_delay_s=3600)
    for _ in range(4):
        h.submit()
    await asyncio.wait_for(h.dispatched.wait(), 1)
    assert h.batches == [(0, [1, 1, 1, 1])]
    await h.close()


async def test_partial_batch_waits_for_the_delay_then_goes():
    h = Harness(max_batch_size=8, max_queue_delay_s=0.2)
    h.submit()
    h.submit(rows=2)
    await asyncio.sleep(0.05)
    assert h.batches == []  # still inside the delay
    await asyncio.wait_for(h.dispatched.wait(), 2)
    assert h.batches == [(0, [1, 2])]
    await h.close()


async def test_delay_is_counted_once_from_the_first_arrival():
    # The first request arrived 0.9 s ago (its arrival stamp says so), five more
    # arrive now. Counted from the first arrival, the 1 s delay ends 0.1 s from now
    # with all six in one batch; a batcher that ignored the delay would send the
    # first alone, and one that restarted it on every arrival would wait a full
    # second from now. No sleeps: the arrivals cannot straddle the deadline.
    h = Harness(max_batch_size=8, max_queue_delay_s=1.0)
    start = now()
    h.submit(arrival=start - 0.9)
    for _ in range(5):
        h.submit()
    await asyncio.wait_for(h.dispatched.wait(), 5)
    waited = now() - start
    assert h.batches == [(0, [1] * 6)]
    assert 0.1 <= waited < 0.9, waited
    await h.close()


async def test_max_batch_size_splits_the_queue():
    h = Harness(workers=3, max_batch_size=4, max_queue_delay_s=0)
    for _ in range(10):
        h.submit()
    await h.settle()
    assert sorted(sum(rows) for _, rows in h.batches) == [2, 4, 4]
    await h.close()


async def test_rows_of_one_request_stay_together():
    h = Harness(workers=2, max_batch_size=4, max_queue_delay_s=0)
    h.submit(rows=3)
    h.submit(rows=3)
    await h.settle()
    assert [rows for _, rows in h.batches] == [[3], [3]]
    await h.close()


async def test_requests_of_other_shapes_do_not_share_a_batch():
    h = Harness(workers=2, max_batch_size=8, max_queue_delay_s=0)
    h.submit(width=4)
    h.submit(width=5)
    await h.settle()
    assert [rows for _, rows in h.batches] == [[1], [1]]
    await h.close()


async def test_preferred_size_cuts_the_batch_and_keeps_the_rest_queued():
    h = Harness(workers=2, max_batch_size=8, max_queue_delay_s=0, preferred_batch_sizes=(2,))
    for _ in range(3):
        h.submit()
    await h.settle()
    assert [rows for _, rows in h.batches] == [[1, 1], [1]]
    await h.close()


async def test_preferred_size_sends_at_once():
    h = Harness(max_batch_size=8, max_queue_delay_s=3600, preferred_batch_sizes=(4,))
    for _ in range(4):
        h.submit()
    await asyncio.wait_for(h.dispatched.wait(), 1)
    assert h.batches == [(0, [1, 1, 1, 1])]
    await h.close()


async def test_batch_keeps_growing_while_every_worker_is_busy():
    h = Harness(workers=1, max_batch_size=16, max_queue_delay_s=0)
    h.submit()
    await h.settle()
    assert h.batches == [(0, [1])]
    for _ in range(5):
        h.submit()
    await h.settle()
    assert len(h.batches) == 1  # the worker is still busy
    h.free(0)
    await h.settle()
    assert h.batches[1] == (0, [1] * 5)
    await h.close()


async def test_a_full_batch_queues_at_the_busy_worker_and_one_that_can_grow_waits():
    h = Harness(workers=1, queue_ahead=True, max_batch_size=4, max_queue_delay_s=0)
    h.submit(rows=4)
    await h.settle()
    h.submit(rows=4)  # full: it queues behind the batch the worker runs
    await h.settle()
    assert h.batches == [(0, [4]), (0, [4])]
    h.submit(rows=4)  # the worker holds one ahead already: this one waits
    h.submit(rows=2)
    await h.settle()
    assert len(h.batches) == 2
    h.free(0)
    await h.settle()
    assert h.batches[2] == (0, [4])
    h.free(0)
    h.free(0)
    await h.settle()
    assert h.batches[3] == (0, [2])  # idle again: a batch that could grow goes only now
    h.submit(rows=1)
    await h.settle()
    assert len(h.batches) == 4  # not full: it waits for the worker, growing
    h.submit(rows=3)
    await h.settle()
    assert h.batches[4] == (0, [1, 3])  # full once the arrival joined it: queued ahead
    await h.close()


async def test_a_batch_the_next_request_does_not_fit_queues_ahead_like_a_full_one():
    # 3 + 2 rows exceed the 4 of a batch: the 3-row batch cannot grow (FIFO), so it
    # goes one ahead of the busy worker's batch as soon as the 2-row request arrives.
    h = Harness(workers=1, queue_ahead=True, max_batch_size=4, max_queue_delay_s=0)
    h.submit(rows=4)
    await h.settle()
    h.submit(rows=3)
    await h.settle()
    assert len(h.batches) == 1  # it could still take a 1-row request: it waits
    h.submit(rows=2)
    await h.settle()
    assert h.batches == [(0, [4]), (0, [3])]
    h.submit(rows=1)
    await h.settle()
    assert len(h.batches) == 2  # one ahead at most: the 2 and 1 rows wait together
    h.free(0)
    h.free(0)
    await h.settle()
    assert h.batches[2] == (0, [2, 1])
    await h.close()


async def test_a_held_batch_goes_to_an_idle_worker_once_the_next_request_does_not_fit():
    # The model would hold any batch a minute for a busy worker (a quick batch
    # waits for the quick batch in flight, to take along what queues meanwhile).
    # A batch that can take nothing along is not held: it takes the idle worker.
    h = Harness(workers=2, hold_s=60.0, max_batch_size=4, max_queue_delay_s=0)
    h.submit(rows=3)
    await h.settle()
    assert h.batches == []  # held: a 1-row request could still join it
    h.submit(rows=2)
    await h.settle()
    assert h.batches == [(0, [3])]
    await asyncio.sleep(0.05)
    assert len(h.batches) == 1  # the 2 rows can grow: held
    h.hold = 0.0
    h.batcher.wake()
    await h.settle()
    assert h.batches[1] == (1, [2])
    await h.close()


async def test_a_full_batch_waits_for_an_idle_worker_when_the_model_says_so():
    h = Harness(workers=1, queue_ahead=False, max_batch_size=4, max_queue_delay_s=0)
    h.submit(rows=4)
    h.submit(rows=4)
    await h.settle()
    assert h.batches == [(0, [4])]
    h.free(0)
    await h.settle()
    assert h.batches == [(0, [4]), (0, [4])]
    await h.close()


async def test_a_batch_that_grew_while_workers_were_busy_is_cut_to_a_preferred_size():
    h = Harness(workers=1, max_batch_size=16, max_queue_delay_s=0, preferred_batch_sizes=(4,))
    h.submit()
    await h.settle()
    assert h.batches == [(0, [1])]  # the only worker is now busy
    for _ in range(6):
        h.submit()
    await h.settle()
    h.free(0)
    await h.settle()
    assert h.batches[1] == (0, [1] * 4)  # 6 waited; the largest preferred size goes
    h.free(0)
    await h.settle()
    assert h.batches[2] == (0, [1, 1])  # the rest, in order, in the next batch
    await h.close()


async def test_full_queue_is_refused_with_its_depth():
    h = Harness(workers=1, max_batch_size=1, max_queue_delay_s=0, max_queue_size=2)
    h.submit()  # runs on the worker
    await h.settle()
    h.submit()  # taken into the next batch, waiting for the busy worker
    await h.settle()
    h.submit()
    h.submit()
    with pytest.raises(ResourceExhausted, match="2 requests waiting"):
        h.submit()
    h.free(0)
    await h.close()


async def test_cancelled_request_is_dropped_before_execution():
    h = Harness(workers=1, max_batch_size=1, max_queue_delay_s=0)
    h.submit()
    await h.settle()
    doomed = h.submit()
    kept = h.submit()
    doomed.future.cancel()
    h.free(0)
    await h.settle()
    assert "cancelled" in h.dropped
    assert len(h.batches) == 2 and kept.future.done() and not kept.future.cancelled()
    await h.close()


async def test_expired_request_is_not_executed():
    h = Harness(workers=1, max_batch_size=1, max_queue_delay_s=0)
    h.submit()
    await h.settle()
    h.submit(deadline=now() + 0.01)
    await asyncio.sleep(0.05)
    h.free(0)
    await h.settle()
    assert h.dropped == ["deadline"]
    assert len(h.batches) == 1
    await h.close()


async def test_closed_batcher_refuses_and_finishes_queued_work():
    h = Harness(workers=1, max_batch_size=4, max_queue_delay_s=3600)
    queued = h.submit()
    h.batcher.close()
    with pytest.raises(Unavailable):
        h.submit()
    await asyncio.wait_for(h.task, 2)
    assert queued.future.done()
