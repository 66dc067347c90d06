"""The dynamic batcher: one asyncio task per model that turns requests into batches.

Batches form the way Ray Serve forms them: block for the first request with no
timeout, fix ONE deadline from that request's arrival (arrival + max delay),
then take what is queued until the batch is full or the deadline passes. If
every worker is busy when the batch is ready, it keeps growing until one frees
up, so a saturated server sends the biggest batches it can; a batch that cannot
grow (full, or the next request does not fit) queues one ahead at a busy worker
instead (scheduler.py). A request that
finds the batcher idle and need not wait for company is dispatched by `submit`
itself, as the task would have dispatched it one loop iteration later.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from trtserve.client.timer import PreciseTimer, now
from trtserve.service.engine.batch import Batch, Request
from trtserve.service.engine.scheduler import Scheduler
from trtserve.service.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "preferred_batch_sizes",
                           tuple(sorted(s for s in set(self.preferred_batch_sizes)
                                        if s <= self.max_batch_size)))

    @property
    def send_at(self) -> int:
        """Rows at which a batch goes without waiting out the delay."""
        return self.preferred_batch_sizes[-1] if self.preferred_batch_sizes \
            else self.max_batch_size


class Dispatcher(Protocol):
    """What the batcher asks of its model (ModelRuntime): the one interface between them.

    The model answers back through `Batcher.submit`, `worker_done`, `worker_freed`
    and `close`; nothing else crosses.
    """

    def dispatch(self, worker: int, batch: Batch) -> None:
        """Run `batch` on `worker`, which the batcher has acquired; the model calls
        `Batcher.worker_done(worker)` when it has finished."""
        ...

    def drop(self, request: Request, reason: str) -> None:
        """A request leaves unexecuted: "cancelled", "deadline", or "unavailable"."""
        ...

    def hold_s(self, batch: Batch) -> float:
        """Seconds the batch should still wait for a worker to free up although another
        one is idle, 0 for none (ModelRuntime: a quick batch waits for the quick batch
        in flight)."""
        ...

    def may_queue(self, batch: Batch) -> bool:
        """Whether this batch, which waiting cannot grow, may queue behind a busy
        worker's batch when no worker is idle (ModelRuntime: when batches of its size
        run short)."""
        ...


class Batcher:
    def __init__(self, model: str, policy: BatchPolicy, scheduler: Scheduler,
                 dispatcher: Dispatcher) -> None:
        self._model_name = model
        self._policy = policy
        self._scheduler = scheduler
        self._dispatch = dispatcher.dispatch
        self._drop = dispatcher.drop
        self._hold_s = dispatcher.hold_s
        self._may_queue = dispatcher.may_queue
        self._pending: deque[Request] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._closed = False
        self._loop = asyncio.get_running_loop()
        self._timer: PreciseTimer | None = None
        # The batch the batcher sleeps on (filling, or waiting for a worker), which
        # arrivals join in place; see _arrival_can_wait.
        self._forming: Batch | None = None
        self._waiting_for_worker = False
        # True while the batcher waits for a first request with nothing queued:
        # only then may `submit` dispatch an arrival itself (see _dispatch_now).
        self._waiting_for_first = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the batcher (and every request's future) runs on."""
        return self._loop

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def backlogged(self) -> bool:
        """A batch waits for a worker with requests queued behind it: an arrival now
        waits at least that batch's run before its own batch can go."""
        return self._waiting_for_worker and bool(self._pending)

    def submit(self, request: Request, more_follow: bool = False) -> None:
        """Queue a request, or refuse it at once (closed, or queue full).

        `more_follow`: the caller is submitting a group (the requests of one
        frame from a frontend process) and this is not its last. It is queued
        rather than dispatched alone, so that the group forms batches together
        instead of a batch of one each (a free worker is free again for every
        request of a group when batches run inline).
        """
        if self._closed:
            raise Unavailable(f"model '{self._model_name}' is shutting down; not accepting "
                              "requests")
        if len(self._pending) >= self._policy.max_queue_size:
            raise ResourceExhausted(
                f"model '{self._model_name}' queue is full: {len(self._pending)} requests waiting "
                f"(max_queue_size={self._policy.max_queue_size})")
        if not more_follow and self._dispatch_now(request):
            return
        self._pending.append(request)
        if self._arrival_can_wait(request):
            return
        self.wake()

    def _dispatch_now(self, request: Request) -> bool:
        """Dispatch a lone arrival here and now when the batcher would do just that next.

        That is when nothing is queued or forming, the request need not wait for
        company (no delay, or it fills a batch by itself), and a worker is free
        and not held. Going through the batcher's task would form the same batch
        one loop iteration later; and when the batch runs inline its request is
        answered before `submit` returns, which saves the handler's wake-up too:
        at concurrency 1 these are two of the loop iterations a call costs.
        """
        policy = self._policy
        if not self._waiting_for_first or self._pending or \
                (policy.max_queue_delay_s > 0 and request.rows < policy.send_at) or \
                request.expired(request.arrival):  # the task drops it, as it drops any
            return False
        batch = Batch()
        batch.add(request)
        if self._hold_s(batch) > 0:
            return False
        worker = self._scheduler.acquire(batch.shapes())
        if worker is None:
            return False
        self._dispatch(worker, batch)
        return True

    def _arrival_can_wait(self, request: Request) -> bool:
        """Join the batch being formed in place; True when the batcher may sleep on.

        While a batch fills, only a full batch (or a head that cannot join it)
        ends the wait before its deadline; while every worker is busy, only a
        worker freeing up or the batch becoming complete does (full, or an arrival
        it cannot take: then it may queue at a busy worker). An arrival that
        joins the batch here, as `_take` would have, changes nothing else, so
        waking the batcher for it would cost a loop iteration per request and
        form the same batch.
        """
        batch = self._forming
        if batch is None:
            return False
        policy = self._policy
        if len(self._pending) == 1 and request.shape_key == batch.shape_key \
                and batch.rows + request.rows <= policy.max_batch_size:
            batch.add(self._pending.pop())
            # Full, it goes now: to an idle worker, or one batch ahead of a busy one.
            return batch.rows < policy.send_at
        # It cannot join: a filling batch goes now. A batch waiting for a worker waits,
        # unless this is the first arrival it cannot take: complete now, it may go
        # ahead to a busy worker, or no longer be held for an idle one.
        return self._waiting_for_worker and len(self._pending) > 1

    def wake(self) -> None:
        """Something changed: a request arrived, a worker freed up, or we are closing."""
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def worker_done(self, worker: int) -> None:
        """The worker has finished the batch it was dispatched: it is free for the next."""
        self._scheduler.release(worker)
        self.worker_freed()

    def worker_freed(self) -> None:
        """A worker finished a batch (or rejoined the rotation): wake a batch that waits for one.

        Nothing else sleeps on workers: a batch filling waits for rows or its
        deadline, and an idle batcher for a request.
        """
        if self._waiting_for_worker:
            self.wake()

    def close(self) -> None:
        """Refuse new requests; `run` returns once everything queued has been dispatched."""
        self._closed = True
        self.wake()

    async def run(self) -> None:
        self._timer = PreciseTimer.create(self._loop, self.wake)
        try:
            await self._run()
        finally:
            if self._timer is not None:
                self._timer.close()
                self._timer = None

    async def _run(self) -> None:
        while True:
            first = await self._first_request()
            if first is None:
                return
            batch = Batch()
            batch.add(first)
            deadline = first.arrival + self._policy.max_queue_delay_s
            await self._fill(batch, deadline)
            self._trim_to_preferred(batch)
            worker = await self._acquire_worker(batch)
            self._prune(batch)
            if worker is None:
                self._refuse(batch)
            elif not batch.requests:
                self._scheduler.release(worker)
            else:
                self._dispatch(worker, batch)
            # Not held across the wait for the next request: the last batch's tensors
            # stayed alive until traffic came, and a client's region with them (mapped
            # after its unregister, in_place).
            del first, batch, worker

    async def _sleep(self, timeout: float | None, deadline: float | None = None) -> None:
        """Until `wake()`, or `timeout` seconds (`deadline` on the serving clock, if known)."""
        self._wakeup = self._loop.create_future()
        handle = None
        if timeout is not None:
            if self._timer is not None:
                # Left armed when something else wakes us first: a late fire is a
                # spurious wake-up, which every caller tolerates (each re-checks
                # its condition), and cheaper than a disarm per batch. Re-arming
                # for the deadline it already holds is skipped.
                self._timer.arm(deadline if deadline is not None
                                else now() + timeout)
            else:
                handle = self._loop.call_later(timeout, self.wake)
        try:
            await self._wakeup
        finally:
            self._wakeup = None
            if handle is not None:
                handle.cancel()

    def _live(self, request: Request) -> bool:
        """False (and the request dropped) if it was cancelled or its deadline passed."""
        if request.answered:
            self._drop(request, "cancelled")
            return False
        if request.expired(now()):
            self._drop(request, "deadline")
            return False
        return True

    async def _first_request(self) -> Request | None:
        while True:
            while self._pending:
                request = self._pending.popleft()
                if self._live(request):
                    return request
            if self._closed:
                return None
            self._waiting_for_first = True
            try:
                await self._sleep(None)
            finally:
                self._waiting_for_first = False

    def _take(self, batch: Batch, limit: int) -> None:
        """Move queued requests into the batch, in order, while they fit."""
        while self._pending and batch.rows < limit:
            head = self._pending[0]
            if head.answered:
                self._pending.popleft()
                self._drop(head, "cancelled")
                continue
            if head.shape_key != batch.shape_key or batch.rows + head.rows > limit:
                return  # FIFO: the head waits for the next batch
            batch.add(self._pending.popleft())

    async def _fill(self, batch: Batch, deadline: float) -> None:
        policy = self._policy
        while True:
            self._take(batch, policy.max_batch_size)
            if batch.rows >= policy.send_at or self._blocked(batch):
                return
            remaining = deadline - now()
            if remaining <= 0 or self._closed:
                return
            self._forming = batch  # _take left nothing queued
            try:
                await self._sleep(remaining, deadline)
            finally:
                self._forming = None

    def _blocked(self, batch: Batch) -> bool:
        """The head of the queue can never join this batch, so waiting gains nothing."""
        if not self._pending:
            return False
        head = self._pending[0]
        return head.shape_key != batch.shape_key or \
            batch.rows + head.rows > self._policy.max_batch_size

    def _complete(self, batch: Batch) -> bool:
        """Waiting cannot grow the batch: it is full, or the queue's head cannot join it.

        With requests of several rows (or groups, queued as one) a batch often
        stops short of full: 48 rows with a 24-row group next, of 64 at most.
        """
        return batch.rows >= self._policy.send_at or self._blocked(batch)

    def _trim_to_preferred(self, batch: Batch) -> None:
        """Cut the batch back to the largest preferred size a prefix of it fills exactly.

        The cut requests return to the front of the queue, in order. With no
        preferred size reachable the batch goes as it is.
        """
        sizes = self._policy.preferred_batch_sizes
        if not sizes or batch.rows in sizes:
            return
        prefix, rows = 0, 0
        best = None
        for i, request in enumerate(batch.requests):
            rows += request.rows
            if rows in sizes:
                best, prefix = rows, i + 1
        if best is None:
            return
        for request in reversed(batch.requests[prefix:]):
            self._pending.appendleft(request)
        del batch.requests[prefix:]
        batch.rows = best

    async def _acquire_worker(self, batch: Batch) -> int | None:
        """A worker for the batch, or None when no healthy worker can ever run it."""
        while True:
            shapes = batch.shapes()
            # A batch that waiting cannot grow (full, or the head of the queue does not
            # fit in it) is not held, and may queue at a busy worker (scheduler.py),
            # where it starts the moment that worker's batch ends.
            complete = self._complete(batch)
            hold_s = 0.0 if complete else self._hold_s(batch)
            worker = None if hold_s > 0 else self._scheduler.acquire(
                shapes, ahead=complete and self._may_queue(batch))
            if worker is not None:
                return worker
            if not self._scheduler.can_ever_run(shapes):
                return None
            # Every fitting worker is busy (or the batch is held): it takes what
            # queued meanwhile once one frees up (or on any other wake-up).
            self._forming, self._waiting_for_worker = batch, True
            try:
                await self._sleep(hold_s if hold_s > 0 else None)
            finally:
                self._forming, self._waiting_for_worker = None, False
            self._take(batch, self._policy.max_batch_size)
            # Cut before asking again: the worker must be one that takes the cut batch.
            self._trim_to_preferred(batch)

    def _refuse(self, batch: Batch) -> None:
        error = Unavailable(f"model '{self._model_name}' has no healthy worker for input shapes "
                            f"{batch.shapes()}")
        for request in batch.requests:
            self._drop(request, "unavailable")
            request.fail(error)

    def _prune(self, batch: Batch) -> None:
        live = [r for r in batch.requests if self._live(r)]
        if len(live) != len(batch.requests):
            batch.requests = live
            batch.rows = sum(r.rows for r in live)

