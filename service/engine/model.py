"""A served model: validation, the batcher, the scheduler and the worker pool.

Everything here runs on the event loop; workers report back through
`_on_done`, one callback per batch. The model is its batcher's Dispatcher
(`dispatch`, `drop`, `hold_s`); the protocol side reaches it only through
engine/local.py. A batch expected to be quick, with the model otherwise idle,
runs on the loop itself (`inline_below_us`): handing it to a worker's thread and
back costs two thread wake-ups, which on a small model is more than the batch
(docs/benchmarks.md has the measurements). Where a quick batch cannot run on the loop (a
TensorRT worker owns its stream), it waits for the quick batch in flight rather
than taking a second worker: it carries more rows, and the loop, not the
backend, is what a quick batch costs (docs/benchmarks-gpu.md, section 3).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import numpy as np

from trtserve.client.dtypes import dtype_name
from trtserve.client.timer import now
from trtserve.service.backends.base import BatchResult, LoadedModel, ModelSpec, Targets
from trtserve.service.config import ModelConfig
from trtserve.service.engine.api import (
    MODEL_VERSION,
    BatchingDescription,
    Keep,
    ModelDescription,
    ModelSnapshot,
)
from trtserve.service.engine.batch import Batch, MemberOutcomes, Outputs, Request, Validated
from trtserve.service.engine.batcher import Batcher, BatchPolicy
from trtserve.service.engine.scheduler import Scheduler
from trtserve.service.engine.stats import Merged, ModelCounters, WorkerStats
from trtserve.service.engine.worker import Outcome, Worker
from trtserve.service.errors import (
    BackendError,
    DeadlineExceeded,
    InputRejected,
    InvalidArgument,
    ResourceExhausted,
    ServeError,
    TensorError,
    Unavailable,
)
from trtserve.service.limits import InputLimits
from trtserve.service.tensors import TensorSpec

log = logging.getLogger(__name__)

DEADLINE = DeadlineExceeded("deadline passed")  # what a cancellation at the deadline counts as

# A client cancels its call when its own deadline fires, which can reach the
# server a little before the server's copy of that deadline (later by the
# transit time): a cancellation this close to the deadline counts as one.
DEADLINE_CANCEL_SLACK_S = 0.05
# Request signatures (names, dtypes, shapes) that validate() has accepted, kept
# to skip re-checking them; bounded so that many odd shapes cannot grow it.
VALIDATED_SIGNATURES = 1024
# Per input: name, dtype, shape, and the wire dtype name where the client gave one.
_Signature = tuple[tuple[str, np.dtype, tuple[int, ...], str | None], ...]
# (rows, non-batch shapes) -> seconds the last such batch took in the executor,
# which predicts whether the next one is quick enough to run inline; bounded.
_RunKey = tuple[int, tuple[tuple[int, ...], ...] | None]
RUN_TIMES_KEPT = 4096
# How long a quick batch waits for the quick batch in flight (see hold_s). A
# quick batch is answered within a few hundred microseconds of its dispatch
# (its run plus two thread hand-offs), later when the loop is busy; one still
# running after this has stalled (the first capture of a CUDA graph for its
# size, a long GC pause), and the waiting batch takes an idle worker after all.
# With the GPU stand-in at saturation, 1 ms ran out on a busy loop and kept
# half of the gain that 5 ms keeps (docs/benchmarks-gpu.md, section 3).
QUICK_HOLD_S = 0.005
# A batch that cannot grow, whose size last ran faster than this, may queue at a busy worker
# (may_queue): a busy loop's hand-off between batches costs about 1-2 ms.
QUEUE_AHEAD_BELOW_S = 0.010


class ModelRuntime:
    def __init__(self, config: ModelConfig, loaded: LoadedModel, stats_window_s: float = 10.0,
                 version: str = MODEL_VERSION):
        self.name = config.name
        # KServe's model version: "1", then one more for each reload (engine/repository.py).
        self.version = version
        self.config = config
        self.spec: ModelSpec = loaded.spec
        self._loaded = loaded
        self.counters = ModelCounters()
        profiles = self.spec.profiles
        # Factories come profile-major: workers [0, k) on profile 0, [k, 2k) on 1, ...
        per_profile = max(1, len(loaded.factories) // len(profiles))
        self.workers = [
            Worker(f"{self.name}-worker-{i}", i, factory,
                   profiles[min(i // per_profile, len(profiles) - 1)], self._on_done,
                   self._on_rebuilt, batching=self.spec.batching)
            for i, factory in enumerate(loaded.factories)
        ]
        self.worker_stats = [WorkerStats(i, stats_window_s) for i in range(len(self.workers))]
        # The model's percentiles, over every worker's window so that each worker counts.
        self._queue_time = Merged([s.queue_time for s in self.worker_stats])
        self._compute_time = Merged([s.compute_time for s in self.worker_stats])
        # Batches handed to each worker and not finished: the one it runs, and at most
        # one queued behind it (scheduler.py).
        self._in_flight = [0] * len(self.workers)
        self._consecutive_failures = [0] * len(self.workers)
        # Workers out of the rotation: the wait before the next rebuild (doubled by
        # each one, back to the start by a batch served), and its timer.
        self._retry_delay_s = [config.worker_retry_backoff_s] * len(self.workers)
        self._retry_timers: list[asyncio.TimerHandle | None] = [None] * len(self.workers)
        # Outputs whose shape disagreed with the declaration, logged once each.
        self._shape_warned: set[str] = set()
        self._validated: dict[_Signature, Validated] = {}
        # Bytes and dimension bounds per input from the config (ConfigError here if
        # they name inputs the model lacks).
        self._limits = InputLimits(config, self.spec)
        self._run_s: dict[_RunKey, float] = {}
        self._inline_below_s = config.inline_below_us / 1e6
        # Batches in flight that were not predicted quick, and when each worker's
        # running batch started (was dispatched, or the one before it ended); see hold_s.
        self._slow_in_flight = 0
        self._dispatched_at = [0.0] * len(self.workers)
        self.scheduler = Scheduler(self.workers)
        self.max_batch_size = min(config.max_batch_size or self.spec.max_batch_size,
                                  self.spec.max_batch_size)
        self.max_rows_per_request = min(config.max_rows_per_request or self.max_batch_size,
                                        self.max_batch_size)
        self.policy = BatchPolicy(
            max_batch_size=self.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_us / 1e6,
            preferred_batch_sizes=config.preferred_batch_sizes,
            max_queue_size=config.max_queue_size,
        )
        self._batcher: Batcher | None = None
        self._description: ModelDescription | None = None
        self._batcher_task: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None
        self.ready = False
        self._draining = False
        # Called on the event loop with (model name, serving) when the last healthy
        # worker leaves the rotation, and when a worker rejoins a model that had
        # none; the server mirrors it in grpc.health.v1.
        self.on_health_change: Callable[[str, bool], None] | None = None

    # --- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.gather(*(w.start() for w in self.workers))
        for worker, stats in zip(self.workers, self.worker_stats, strict=True):
            stats.started_on(worker.info)
        self._idle = asyncio.Event()
        self._idle.set()
        self._batcher = Batcher(self.name, self.policy, self.scheduler, self)
        self._batcher_task = asyncio.create_task(self._batcher.run(), name=f"{self.name}-batcher")
        self.ready = True

    async def drain(self) -> None:
        """Refuse new requests, then wait until every accepted one is answered."""
        self.ready = False
        self._draining = True
        if self._batcher is None or self._batcher_task is None or self._idle is None:
            return
        self._batcher.close()
        await self._batcher_task
        await self._idle.wait()

    async def stop(self) -> None:
        await self.drain()
        for i, timer in enumerate(self._retry_timers):
            if timer is not None:
                timer.cancel()
                self._retry_timers[i] = None
        await asyncio.gather(*(w.stop() for w in self.workers))
        self._loaded.close()

    # --- requests ----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._batcher.depth if self._batcher else 0

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight)

    @property
    def backlogged(self) -> bool:
        return self._batcher is not None and self._batcher.backlogged

    @property
    def healthy_workers(self) -> int:
        return sum(w.healthy for w in self.workers)

    def description(self) -> ModelDescription:
        """What the protocol side may know of this model; the same while it is loaded.

        Computed once, once the workers have started (where each runs is known then):
        frontends ask for it on every request.
        """
        if self._description is None or not self.ready:
            self._description = self._describe()
        return self._description

    def _describe(self) -> ModelDescription:
        return ModelDescription(
            name=self.name, version=self.version, spec=self.spec, config=self.config,
            batching=BatchingDescription(
                max_batch_size=self.max_batch_size,
                max_rows_per_request=self.max_rows_per_request,
                max_queue_delay_s=self.policy.max_queue_delay_s,
                preferred_batch_sizes=tuple(self.policy.preferred_batch_sizes),
                max_queue_size=self.policy.max_queue_size),
            # The profile a worker serves is the scheduler's (its ProfileSpec), whatever
            # its executor reported.
            workers=tuple(replace(s.info, profile=w.profile.index)
                          for w, s in zip(self.workers, self.worker_stats, strict=True)))

    def snapshot(self) -> ModelSnapshot:
        """The model's counters and every worker's, read now (on the event loop)."""
        healthy = self.healthy_workers
        return ModelSnapshot(
            name=self.name, version=self.version, ready=self.ready and healthy > 0,
            healthy_workers=healthy, queue_depth=self.queue_depth, in_flight=self.in_flight,
            counters=self.counters.snapshot(),
            workers=tuple(s.snapshot(n, w.healthy) for s, n, w in
                          zip(self.worker_stats, self._in_flight, self.workers, strict=True)),
            queue_time=self._queue_time.summary(),
            compute_time=self._compute_time.summary())

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        deadline: float | None = None,
        dtypes: Mapping[str, str] | None = None,
        validated: Validated | None = None,
        targets: Targets | None = None,
        keep: Keep | None = None,
    ) -> Outputs:
        """Run one request (one or more rows) through the batcher.

        `deadline` is on the serving clock (`trtserve.client.timer.now`). `dtypes` gives
        wire dtype names where numpy can't tell them apart (BF16 travels as uint16).
        `validated`: what `validate` answered for these inputs, if the caller asked.
        `targets`: outputs the executor writes into the caller's memory (a region's);
        the answer holds views of them (or DeviceTensors) for those outputs.
        `keep`: for a caller that lent memory (inputs viewing a region or an arena,
        targets in a region): called if the request ends while its batch still runs
        (cancelled on the device), so that the caller gives the memory back only once
        that batch is done, when the model calls what `keep` returned. The caller's
        answer (CANCELLED) is not delayed.
        """
        request = self._queue(inputs, deadline, dtypes, validated, False, targets)
        try:
            return await self._outcome(request)
        finally:
            # However the request ended, a batch still running uses its memory.
            if keep is not None and request.running:
                request.after_batch(keep())

    async def _outcome(self, request: Request) -> Outputs:
        """The request's answer.

        How the request ended is counted here, once: the batcher may answer a
        request whose deadline passed in the queue just before grpc.aio cancels
        its handler for the same deadline, and only one of the two reaches us.
        """
        try:
            outputs = await request.future
        except asyncio.CancelledError:
            # grpc.aio cancels the handler when its client cancels or its deadline
            # passes; the batcher then drops the request unexecuted (see drop).
            self._count_cancelled(request)
            raise
        except ServeError as e:
            self._count_failed(request, e)
            raise
        self._count_success(request)
        return outputs

    def submit(self, inputs: Mapping[str, np.ndarray], deadline: float | None,
               dtypes: Mapping[str, str], validated: Validated | None,
               more_follow: bool, on_done: Callable[[Request], None],
               members: tuple[int, ...] = (),
               parts: Mapping[str, list[np.ndarray]] | None = None) -> Request:
        """`infer` without a coroutine: the request queued; `on_done(request)` once its
        future is done (at once, before this returns, when its batch ran inline; for a
        request cancelled while its batch runs, once that batch is done: its inputs may
        view memory the caller lent, which `on_done` gives back).
        Refusals raise here.

        For the engine process, which takes requests by the frame: no task per
        request, no loop callback per request (`on_done` is called from where the
        request is answered, failed or cancelled: `Request.on_settled`), and
        `more_follow` (see `Batcher.submit`) lets a frame's requests form batches
        together. `Request.cancel()` (not the future's) takes the request out of
        its batch, as cancelling `infer` does; the outcome is counted as `infer`
        counts it, before `on_done`.

        `members`: the rows of each client request a group stacks (engine/groups.py);
        the group is counted as that many requests, and its answer may be
        `MemberOutcomes` (see `_answer_parts`); `parts`: inputs it leaves in its
        members' memory (`Request.parts`), which `inputs` then only describes.
        """
        return self._queue(inputs, deadline, dtypes, validated, more_follow,
                           on_settled=lambda request: self._settled(request, on_done),
                           members=members, parts=parts)

    def _queue(self, inputs: Mapping[str, np.ndarray], deadline: float | None,
               dtypes: Mapping[str, str] | None, validated: Validated | None,
               more_follow: bool, targets: Targets | None = None,
               on_settled: Callable[[Request], None] | None = None,
               members: tuple[int, ...] = (),
               parts: Mapping[str, list[np.ndarray]] | None = None) -> Request:
        if self._draining:
            raise Unavailable(f"model '{self.name}' is shutting down; not accepting requests")
        if self._batcher is None or not self.ready:
            raise Unavailable(f"model '{self.name}' is not ready")
        rows, shape_key = validated or self.validate(inputs, dtypes or {})
        count = len(members) or 1
        request = Request(dict(inputs), rows, shape_key, now(), deadline,
                          self._batcher.loop.create_future(), targets or {},
                          on_settled=on_settled, count=count, members=members, parts=parts)
        try:
            self._batcher.submit(request, more_follow)
        except ResourceExhausted:
            self.counters.rejected_queue_full += count
            raise
        counters = self.counters
        counters.requests += count
        if members:
            counters.groups += 1
            counters.grouped_requests += count
        return request

    def _settled(self, request: Request, on_done: Callable[[Request], None]) -> None:
        future = request.future
        # A group's members cancelled while it went on are counted as given up, not
        # with the group's outcome.
        given_up = request.members_cancelled
        if future.cancelled():
            if request.members:
                self._count_given_up(request)
            else:
                self._count_cancelled(request)
        else:
            if isinstance(error := future.exception(), ServeError):
                self._count_failed(request, error, request.count - given_up)
            elif error is None:
                if isinstance(outcomes := future.result(), MemberOutcomes):
                    self._count_members(request, outcomes, given_up)
                else:
                    self._count_success(request, request.count - given_up)
            if given_up:
                self._count_given_up(request)
        if request.running:
            # Cancelled while its batch runs: the caller's memory (an arena range the
            # inputs view) is given back, by on_done, only once that batch is done.
            request.after_batch(lambda: on_done(request))
        else:
            on_done(request)

    def _count_cancelled(self, request: Request) -> None:
        if request.expired(now() + DEADLINE_CANCEL_SLACK_S):
            # Counted as the batcher's own deadline drop is (_count_failed): whichever
            # noticed the deadline first, the client got DEADLINE_EXCEEDED.
            self._count_failed(request, DEADLINE)
        else:
            self.counters.cancelled += request.count

    def _count_failed(self, request: Request, error: ServeError,
                      count: int | None = None) -> None:
        count = request.count if count is None else count
        if isinstance(error, DeadlineExceeded):
            self.counters.deadline_exceeded += count
        self.counters.failure += count
        self.counters.failure_s += (now() - request.arrival) * count

    def _count_success(self, request: Request, count: int | None = None) -> None:
        count = request.count if count is None else count
        elapsed = now() - request.arrival
        counters = self.counters
        counters.success += count
        counters.success_s += elapsed * count
        counters.success_histogram.observe(elapsed, count)

    def _count_given_up(self, request: Request) -> None:
        """A group's members cancelled while the group went on (its own count is theirs
        when the whole group was cancelled)."""
        expired = request.members_expired
        if expired:
            self._count_failed(request, DEADLINE, expired)
        self.counters.cancelled += request.members_cancelled - expired

    def _count_members(self, request: Request, outcomes: MemberOutcomes, given_up: int) -> None:
        failed = [e for e in outcomes if isinstance(e, ServeError)]
        if (answered := len(outcomes) - len(failed) - given_up) > 0:
            self._count_success(request, answered)
        for error in failed:
            self._count_failed(request, error, 1)

    def validate(self, inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> Validated:
        """The request's rows and the shape key of batches it may join; TensorError naming
        what is wrong.

        The answer depends only on the inputs' names, dtypes and shapes, and most
        requests repeat a few of those: an accepted signature is answered from
        memory (the checks were the largest of trtserve's own costs per request
        in the event loop's profile). Refusals are checked afresh every time.
        """
        # A list comprehension, not a generator: this runs for every request.
        signature = tuple([(name, a.dtype, a.shape, dtypes.get(name))
                           for name, a in inputs.items()])
        known = self._validated.get(signature)
        if known is not None:
            return known
        result = self._check(inputs, dtypes)
        self._limits.check(inputs)
        if len(self._validated) < VALIDATED_SIGNATURES:
            self._validated[signature] = result
        return result

    def _check(self, inputs: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> Validated:
        spec = self.spec
        batching = spec.batching
        expected = [t.name for t in spec.inputs]
        for name in inputs:
            if spec.input(name) is None:
                raise TensorError(name, f"unknown input; model '{self.name}' takes {expected}")
        rows_seen: set[int] = set()
        key = []
        for tensor in spec.inputs:
            array = inputs.get(tensor.name)
            if array is None:
                raise TensorError(tensor.name, f"missing; model '{self.name}' takes {expected}")
            got = dtypes.get(tensor.name) or _wire_name(array)
            if got != tensor.dtype and not (tensor.dtype == "BF16" and got == "UINT16"
                                            and tensor.name not in dtypes):
                raise TensorError(tensor.name, f"dtype {got}, but the model takes {tensor.dtype}")
            if array.ndim != len(tensor.shape):
                raise TensorError(tensor.name, f"shape {list(array.shape)} has {array.ndim} "
                                  f"dimensions, the model takes {len(tensor.shape)}: "
                                  f"{list(tensor.shape)}")
            for axis, (got_dim, want) in enumerate(zip(array.shape, tensor.shape, strict=True)):
                if (axis > 0 or not batching) and want != -1 and got_dim != want:
                    raise TensorError(tensor.name, f"shape {list(array.shape)} does not match "
                                      f"the model's {list(tensor.shape)} in dimension {axis}")
            if batching:
                rows_seen.add(array.shape[0])
                key.append(tuple(array.shape[1:]))
            else:
                key.append(tuple(array.shape))
        if not batching:
            # One request, one execution, its full shapes as given: "rows" is 1 so
            # that the batcher, whose batches hold at most 1, never merges two.
            rows_seen = {1}
        elif len(rows_seen) > 1:
            raise TensorError(expected[0], f"inputs disagree on the number of rows: "
                              f"{sorted(rows_seen)}")
        _check_named_dims(spec.inputs, inputs)
        rows = rows_seen.pop()
        if rows < self.spec.min_batch_size or rows > self.max_rows_per_request:
            raise TensorError(expected[0], f"{rows} rows; this model takes "
                              f"{self.spec.min_batch_size} to {self.max_rows_per_request} "
                              f"rows per request")
        shapes = {t.name: tuple(inputs[t.name].shape) for t in spec.inputs}
        if not any(p.accepts(shapes) for p in spec.profiles):
            ranges = {p.index: {n: (list(r[0]), list(r[2])) for n, r in p.ranges.items()}
                      for p in spec.profiles}
            raise TensorError(expected[0], f"shapes {shapes} fit no optimization profile "
                              f"(min, max per profile: {ranges})")
        return Validated(rows, tuple(key))

    # --- batches: the batcher's Dispatcher -------------------------------------------

    def dispatch(self, index: int, batch: Batch) -> None:
        """Run the batch on worker `index` (which the batcher has acquired for it)."""
        quick = self._quick(batch)
        # A quick batch runs on the loop only while nothing else is in flight.
        run_on_loop = quick and self.in_flight == 0
        batch.slow = not quick
        if batch.slow:
            self._slow_in_flight += 1
        dispatched = now()
        if not self._in_flight[index]:
            self._dispatched_at[index] = dispatched
        stats = self.worker_stats[index]
        for request in batch.requests:
            stats.record_queue(dispatched - request.arrival, request.count)
            request.running = True
        self._in_flight[index] += 1
        assert self._idle is not None
        self._idle.clear()
        worker = self.workers[index]
        if run_on_loop and (result := worker.run_inline(batch)) is not None:
            stats.inline_batches += 1
            self._on_done(worker, Outcome(batch, result))
            return
        worker.submit(batch)

    def _quick(self, batch: Batch) -> bool:
        """Whether the last batch of this size ran in under `inline_below_us`."""
        if self._inline_below_s <= 0:
            return False
        last = self._run_s.get((batch.rows, batch.shape_key))
        return last is not None and last < self._inline_below_s

    def hold_s(self, batch: Batch) -> float:
        """How much longer a quick batch waits for the batches in flight, all quick (0: none).

        A second worker would run it alongside, but a quick batch costs the
        event loop (a hand-off to a thread, a callback back, and the Python
        around a launch) more than it costs the backend: at one row per request
        every request would become a batch of its own. Waiting costs about one
        quick batch's time and the batch takes along what queues meanwhile.
        Behind a slow batch it does not wait, nor behind one that has stalled
        (QUICK_HOLD_S); nor does a full batch, which can take nothing along: under
        load, full quick batches run side by side on every worker rather than one at
        a time. (The batcher holds no batch that the queue's head cannot join either.)
        """
        if self._slow_in_flight or batch.rows >= self.max_batch_size or not self._quick(batch):
            return 0.0
        first = min((at for at, n in zip(self._dispatched_at, self._in_flight, strict=True)
                     if n), default=None)
        return 0.0 if first is None else max(0.0, first + QUICK_HOLD_S - now())

    def may_queue(self, batch: Batch) -> bool:
        """Whether a batch that cannot grow may wait at a busy worker, one ahead (scheduler.py).

        Only when the last batch of its size ran in under QUEUE_AHEAD_BELOW_S: the
        hand-off it saves (the loop seeing a batch end, then dispatching the next)
        weighs against a short batch, and a request committed to a worker early
        runs even if it is cancelled meanwhile, so the wait it may cost stays short.
        """
        last = self._run_s.get((batch.rows, batch.shape_key))
        return last is not None and last < QUEUE_AHEAD_BELOW_S

    def drop(self, request: Request, reason: str) -> None:
        """A request leaves the queue unexecuted: "cancelled", "deadline" or "unavailable"."""
        if reason == "cancelled":
            pass  # counted in infer(), where the cancellation arrived
        elif reason == "deadline":
            # Counted in infer(), which this exception (or a cancellation) reaches.
            request.fail(DeadlineExceeded(
                f"model '{self.name}': deadline passed while queued; not executed"))
        else:  # "unavailable": the batcher fails it, naming the batch's shapes
            self.counters.errors += 1

    def _on_done(self, worker: Worker, outcome: Outcome) -> None:
        index = worker.index
        self._in_flight[index] -= 1
        batch = outcome.batch
        if batch.slow:
            self._slow_in_flight -= 1
        if self._in_flight[index]:  # the batch queued behind this one starts now
            self._dispatched_at[index] = now()
        # The batch is done with its requests' memory: what was lent to a request
        # cancelled meanwhile may be given back now (a region unregistered, an arena
        # range reused), and the answers below settle their requests at once.
        for request in batch.requests:
            try:
                request.batch_done()
            except Exception:  # the batch must still be answered and the worker released
                log.exception("model '%s': giving back a cancelled request's memory "
                              "failed", self.name)
        if (result := outcome.result) is not None:
            self._succeeded(index, batch.rows, batch.count, result)
            key = (batch.rows, batch.shape_key)
            if key in self._run_s or len(self._run_s) < RUN_TIMES_KEPT:
                self._run_s[key] = result.input_s + result.compute_s + result.output_s
            if not self.spec.batching:
                self._note_output_shapes(result.outputs)
            for request, outputs in batch.split(result.outputs, self.spec.batching,
                                                result.placed):
                request.answer(outputs)
        elif outcome.parts is not None:
            self._answer_parts(worker, outcome)
        else:
            self._fail_batch(worker, outcome, batch.requests)
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()
        if self._batcher is not None:
            self._batcher.worker_done(index)
        else:
            self.scheduler.release(index)

    def _note_output_shapes(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Log, once per output, an output whose shape disagrees with its declaration.

        A model that does not batch returns its outputs as produced: exported
        models often declare shapes their graph does not keep (ONNX Runtime
        itself only warns), and the client gets what the model computed.
        """
        for name, array in outputs.items():
            if name in self._shape_warned:
                continue
            declared = self.spec.output(name)
            if declared is None or (array.ndim == len(declared.shape) and all(
                    want in (-1, got) for got, want in zip(array.shape, declared.shape,
                                                           strict=True))):
                continue
            self._shape_warned.add(name)
            log.warning("model '%s': output '%s' came out with shape %s, but the model "
                        "declares %s; returned as produced (logged once)", self.name, name,
                        list(array.shape), list(declared.shape))

    def _succeeded(self, index: int, rows: int, requests: int, result: BatchResult) -> None:
        self._consecutive_failures[index] = 0
        # Only a batch served proves a rebuilt worker sound: one whose rebuilds
        # succeed but whose batches keep failing still backs off further each time.
        self._retry_delay_s[index] = self.config.worker_retry_backoff_s
        stats = self.worker_stats[index]
        stats.record_batch(rows, requests, result.compute_s, result.graph_launch,
                           result.input_s, result.output_s)
        self.counters.copies_avoided += result.copies_avoided
        if result.io_path:
            self.counters.io_paths[result.io_path] += 1
        if result.capture_failure is not None:
            stats.record_capture_failure(*result.capture_failure)

    def _answer_parts(self, worker: Worker, outcome: Outcome) -> None:
        """The backend refused the batch's input; its requests ran again one by one.

        A refused input is the request's fault: INVALID_ARGUMENT with the
        backend's reason, and the worker neither rebuilds nor counts a failure.
        """
        assert outcome.parts is not None
        index = worker.index
        failed = []
        for request, part in zip(outcome.batch.requests, outcome.parts, strict=True):
            if isinstance(part, list):  # a group, its members run one by one
                request.answer(MemberOutcomes(self._member_outcome(index, r, p)
                                              for r, p in zip(request.members, part,
                                                              strict=True)))
            elif isinstance(part, BatchResult):
                self._succeeded(index, request.rows, request.count, part)
                if not self.spec.batching:
                    self._note_output_shapes(part.outputs)
                request.answer({**part.outputs, **{name: array for (_, name), array
                                                   in part.placed.items()}})
            elif isinstance(part, InputRejected):
                self.worker_stats[index].rejected += 1
                request.fail(InvalidArgument(
                    f"model '{self.name}' cannot run this input: {part.reason}"))
            else:
                failed.append(request)
        if outcome.error is not None:
            self._fail_batch(worker, outcome, failed)

    def _member_outcome(self, index: int, rows: int, part: BatchResult | InputRejected
                        ) -> Outputs | ServeError:
        """One member of a group, run alone: its outputs, or its input's refusal as a
        request's (a worker's own failure fails the whole batch: _fail_batch)."""
        if isinstance(part, BatchResult):
            self._succeeded(index, rows, 1, part)
            return part.outputs
        self.worker_stats[index].rejected += 1
        return InvalidArgument(f"model '{self.name}' cannot run this input: {part.reason}")

    def _fail_batch(self, worker: Worker, outcome: Outcome, requests: list[Request]) -> None:
        """The worker's own failure: its `requests` fail with INTERNAL, and it may leave."""
        index = worker.index
        stats = self.worker_stats[index]
        kind = type(outcome.error).__name__
        rows = sum(r.rows for r in requests)
        # Stats reach clients: the exception's text (paths, internals) stays in the log.
        stats.record_failure(f"{kind} on a batch of {rows} rows; see the server log")
        self._consecutive_failures[index] += 1
        if outcome.rebuilt:
            stats.rebuilds += 1
        failures = self._consecutive_failures[index]
        if not worker.healthy:
            pass  # out already: this batch was queued behind the one that took it out
        elif not outcome.rebuilt:
            self._take_out(worker, f"{outcome.rebuild_error} after {kind}")
        elif failures >= self.config.max_worker_failures:
            self._take_out(worker, f"{failures} consecutive failures, the last {kind}")
        error = BackendError(f"model '{self.name}': inference failed on worker {index} "
                             f"({kind}); the batch of {rows} rows was not completed")
        self.counters.errors += sum(r.count for r in requests)
        for request in requests:
            request.fail(error)

    # --- workers out of the rotation ---------------------------------------------------

    def _take_out(self, worker: Worker, why: str) -> None:
        """Take the worker out of the rotation; it is rebuilt after a backoff."""
        index = worker.index
        worker.healthy = False
        stats = self.worker_stats[index]
        stats.last_error = f"out of the rotation: {why}"
        delay = self._schedule_rebuild(index)
        log.error("model '%s': worker %d taken out of the rotation (%s); rebuilding it in "
                  "%.3g s", self.name, index, why, delay)
        if self.healthy_workers == 0 and self.on_health_change is not None:
            self.on_health_change(self.name, False)

    def _schedule_rebuild(self, index: int) -> float:
        """Rebuild the worker after its backoff, which doubles for next time; the wait."""
        delay = self._retry_delay_s[index]
        self._retry_delay_s[index] = min(2 * delay, self.config.worker_retry_backoff_max_s)
        stats = self.worker_stats[index]
        stats.state = "backing_off"
        stats.retry_at_s = time.monotonic() + delay
        self._retry_timers[index] = asyncio.get_running_loop().call_later(
            delay, self._start_rebuild, index)
        return delay

    def _start_rebuild(self, index: int) -> None:
        self._retry_timers[index] = None
        if self._draining:
            return
        stats = self.worker_stats[index]
        stats.state, stats.retry_at_s = "rebuilding", 0.0
        stats.retries += 1
        self.workers[index].request_rebuild()

    def _on_rebuilt(self, worker: Worker, error: str) -> None:
        """A worker out of the rotation was rebuilt ('') or not (why)."""
        index = worker.index
        stats = self.worker_stats[index]
        if error:
            stats.last_error = f"out of the rotation: {error}"
            if self._draining:
                return
            delay = self._schedule_rebuild(index)
            log.error("model '%s': worker %d could not be rebuilt (%s); trying again in "
                      "%.3g s", self.name, index, error, delay)
            return
        was_serving = self.healthy_workers > 0
        self._consecutive_failures[index] = 0
        stats.rebuilds += 1
        stats.state = "serving"
        worker.healthy = True
        log.warning("model '%s': worker %d rebuilt, back in the rotation", self.name, index)
        if not was_serving and self.on_health_change is not None:
            self.on_health_change(self.name, True)
        if self._batcher is not None:
            self._batcher.worker_freed()


def _check_named_dims(tensors: tuple[TensorSpec, ...], inputs: Mapping[str, np.ndarray]) -> None:
    """Dimensions the model names alike ("N" of [N, 512] and [2, N, 128]) must agree.

    The backend would fail the execution instead, as a server error, and take
    the worker through a rebuild for a client's mistake.
    """
    seen: dict[str, tuple[int, str, int]] = {}
    for tensor in tensors:
        for axis, name in enumerate(tensor.dim_names):
            if name is None:
                continue
            size = inputs[tensor.name].shape[axis]
            first = seen.setdefault(name, (size, tensor.name, axis))
            if first[0] != size:
                raise TensorError(tensor.name, f"dimension {axis} ('{name}') is {size}, but "
                                  f"dimension {first[2]} of '{first[1]}', which the model "
                                  f"names alike, is {first[0]}")


def _wire_name(array: np.ndarray) -> str:
    try:
        return dtype_name(array.dtype)
    except ValueError:
        return str(array.dtype)
