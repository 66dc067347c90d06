"""A worker: one thread that owns one executor (context + stream, or a session).

Work crosses into the thread through its inbox (the batch it runs, and at most
one queued behind it: scheduler.py) and comes back with a single
`loop.call_soon_threadsafe` per batch. The thread builds (and rebuilds) the
executor; the one other caller is `run_inline`, on the event loop, for an
executor that allows it, and only while the scheduler has handed this worker
that batch, so the thread is idle, waiting on its inbox.

A batch the backend refuses for its input (`InputRejected`), or answers with
outputs of other rows than the batch's (`OutputRowsError`), is the request's
fault, not the executor's: the executor is kept, and when the batch holds
several requests each runs again alone, so that only the ones at fault fail.
Any other failure is the worker's: the executor is rebuilt. A worker out of
the rotation is rebuilt again when the model asks (`request_rebuild`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from trtserve.service.backends.base import (
    BatchResult,
    Executor,
    ExecutorFactory,
    ProfileSpec,
    Targets,
    WorkerInfo,
)
from trtserve.service.engine.batch import Batch, Request
from trtserve.service.errors import InputRejected

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a batch came to, reported to the event loop."""

    batch: Batch
    result: BatchResult | None
    error: BaseException | None = None
    # After a failure the executor is rebuilt; these say how that went.
    rebuilt: bool = False
    rebuild_error: str = ""
    # Set when the backend refused the batch's input and its requests ran again
    # one by one: per request of the batch, its own result or its error (an
    # InputRejected, or `error` for those a worker failure left unrun).
    # A group's entry is its members' outcomes, each as a request's would be.
    parts: list[BatchResult | BaseException | list[BatchResult | InputRejected]] | None = None


class _Rebuild:
    """Put in a worker's inbox to have its thread rebuild the executor."""


_REBUILD = _Rebuild()


class Worker:
    def __init__(
        self,
        name: str,
        index: int,
        factory: ExecutorFactory,
        profile: ProfileSpec,
        on_done: Callable[[Worker, Outcome], None],
        on_rebuilt: Callable[[Worker, str], None] | None = None,
        batching: bool = True,
    ) -> None:
        self.name = name
        # False: each batch is one request with its full shapes (no batch dimension),
        # and its outputs are returned as the model produces them.
        self.batching = batching
        self.index = index
        self.profile = profile
        self.info = WorkerInfo()
        self.healthy = False  # until the executor exists
        self._factory = factory
        self._on_done = on_done
        # Called on the loop after `request_rebuild` with '' or why the build failed.
        self._on_rebuilt = on_rebuilt
        self._inbox: queue.SimpleQueue[Batch | _Rebuild | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._executor: Executor | None = None  # written by the thread only
        # Set when a batch run on the loop failed: later ones go to the thread,
        # which judges (and rebuilds) the executor; cleared by its next success.
        self._inline_failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future[WorkerInfo] | None = None

    # --- event-loop side -----------------------------------------------------

    @property
    def available(self) -> bool:
        return self.healthy

    def accepts(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        if not self.batching:
            return self.profile.accepts(shapes)
        rows = next(iter(shapes.values()))[0] if shapes else 1
        if not self.info.min_batch_size <= rows <= self.info.max_batch_size:
            return False
        return self.profile.accepts(shapes)

    async def start(self) -> None:
        """Start the thread and wait until it has built its executor."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._thread.start()
        self.info = await self._ready
        self.healthy = True

    def submit(self, batch: Batch) -> None:
        self._inbox.put(batch)

    def request_rebuild(self) -> None:
        """Rebuild the executor on the worker's thread; `on_rebuilt` says how it went.

        Only for a worker out of the rotation: the scheduler gives it no batch,
        so the thread is idle and the rebuild waits for nothing.
        """
        self._inbox.put(_REBUILD)

    def run_inline(self, batch: Batch) -> BatchResult | None:
        """Run `batch` here, on the event loop; None when this worker can't (then submit it).

        The caller holds this worker from the scheduler, so the thread has no
        batch in hand. A failure is not judged here: the batch goes to the
        thread, which runs it again and rebuilds the executor if it fails there
        (or, for an input the backend refused, runs its requests one by one).
        """
        executor = self._executor
        if executor is None or not self.info.runs_on_any_thread or self._inline_failed:
            return None
        try:
            return self._checked(_execute(executor, batch.inputs(), batch.rows, batch.targets()),
                                 batch.rows)
        except InputRejected:
            return None  # the executor is fine: later batches may still run here
        except Exception:
            log.warning("%s: a batch of %d rows failed on the event loop; handing it to the "
                        "worker's thread", self.name, batch.rows, exc_info=True)
            self._inline_failed = True
            return None

    async def stop(self) -> None:
        """Finish the batch in hand (if any), close the executor, join the thread."""
        self._inbox.put(None)
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    # --- worker-thread side --------------------------------------------------

    def _report(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            log.warning("%s: event loop closed before a result could be delivered", self.name)

    def _main(self) -> None:
        assert self._ready is not None
        try:
            first = self._factory()
        except BaseException as e:  # reported to start(); the thread ends
            self._report(_set_exception, self._ready, e)
            return
        self._executor = first
        self._report(_set_result, self._ready, first.info)
        while (item := self._inbox.get()) is not None:
            if isinstance(item, _Rebuild):
                error = self._rebuild()
                if self._on_rebuilt is not None:
                    self._report(self._on_rebuilt, self, error)
                continue
            self._report(self._on_done, self, self._run(item))
            # The batch is the loop's now: holding it until the next one came kept its
            # inputs alive, and with them a client's region mapped after its unregister.
            del item
        if self._executor is not None:
            self._executor.close()

    def _checked(self, result: BatchResult, rows: int) -> BatchResult:
        # Without batching nothing is sliced out by rows: any shape is the request's own.
        return _checked(result, rows) if self.batching else result

    def _run(self, batch: Batch) -> Outcome:
        if self._executor is None and self._rebuild():
            return Outcome(batch, None, RuntimeError("worker could not be rebuilt"),
                           rebuild_error="executor unavailable")
        executor = self._executor
        assert executor is not None
        try:
            outcome = Outcome(batch, self._checked(
                _execute(executor, batch.inputs(), batch.rows, batch.targets()), batch.rows))
        except InputRejected as e:
            outcome = self._run_alone(executor, batch, e)
        except Exception as e:
            log.exception("%s: batch of %d rows failed", self.name, batch.rows)
            return self._failed(batch, e)
        self._inline_failed = False
        return outcome

    def _run_alone(self, executor: Executor, batch: Batch, rejected: InputRejected) -> Outcome:
        """Run each request of a refused batch alone, so only those at fault fail; a
        group (Request.members) runs member by member, each member getting its own
        outcome, as it would have alone."""
        if len(batch.requests) == 1 and not batch.requests[0].members:
            # The request's fault, answered INVALID_ARGUMENT: not worth a warning each.
            log.info("%s: the model cannot run a request's input: %s", self.name,
                     rejected.reason)
            return Outcome(batch, None, parts=[rejected])
        parts: list[BatchResult | BaseException | list[BatchResult | InputRejected]] = []
        for i, request in enumerate(batch.requests):
            if request.members:
                members = self._members_alone(executor, request)
                if isinstance(members, Exception):
                    outcome = self._failed(batch, members)
                    outcome.parts = parts + [members] * (len(batch.requests) - i)
                    return outcome
                parts.append(members)
                continue
            try:
                parts.append(self._alone(executor, request.inputs, request.rows,
                                         request.targets))
            except Exception as e:
                outcome = self._failed(batch, e)
                outcome.parts = parts + [e] * (len(batch.requests) - i)
                return outcome
        return Outcome(batch, None, parts=parts)

    def _alone(self, executor: Executor, inputs: Mapping[str, np.ndarray], rows: int,
               targets: Targets | None) -> BatchResult | InputRejected:
        """One request run alone: its result, or the backend's refusal of its input;
        raises the worker's own failures."""
        try:
            return self._checked(_execute(executor, {name: [array] for name, array
                                                     in inputs.items()},
                                          rows, [targets] if targets else None), rows)
        except InputRejected as e:
            log.info("%s: the model cannot run a request's input: %s", self.name, e.reason)
            return e
        except Exception:
            log.exception("%s: a request of %d rows failed on its own", self.name, rows)
            raise

    def _members_alone(self, executor: Executor, group: Request
                       ) -> list[BatchResult | InputRejected] | Exception:
        """Each member of a group run alone, or the worker's failure."""
        results: list[BatchResult | InputRejected] = []
        start = 0
        parts = group.parts or {}
        for i, rows in enumerate(group.members):
            inputs = {name: parts[name][i] if name in parts else array[start:start + rows]
                      for name, array in group.inputs.items()}
            start += rows
            try:
                results.append(self._alone(executor, inputs, rows, None))
            except Exception as e:
                return e
        return results

    def _failed(self, batch: Batch, error: Exception) -> Outcome:
        """The worker's own failure: a context or stream may be in a bad state, start afresh."""
        problem = self._rebuild()
        return Outcome(batch, None, error, rebuilt=not problem, rebuild_error=problem)

    def _rebuild(self) -> str:
        """Close the executor (if any) and build a new one: '' or why that failed."""
        if self._executor is not None:
            try:
                self._executor.close()
            except Exception:
                log.exception("%s: closing the failed executor raised", self.name)
            self._executor = None
        try:
            self._executor = self._factory()
        except Exception as e:
            log.exception("%s: rebuilding the executor failed", self.name)
            return f"{type(e).__name__} rebuilding the executor"
        return ""


def _execute(executor: Executor, inputs: Mapping[str, Sequence[np.ndarray]], rows: int,
             targets: Sequence[Targets] | None) -> BatchResult:
    """Run a batch, handing the executor its requests' output targets where there are any
    (so that executors written before targets existed keep working without them)."""
    if targets is None:
        return executor.run(inputs, rows)
    return executor.run(inputs, rows, targets)


class OutputRowsError(InputRejected):
    """The model answered a batch with outputs whose rows do not match the batch's.

    Answers are sliced out of the outputs by row, so the batch cannot be answered.
    It is what the model does with this input (a Reshape with a -1 that folds the
    width into the rows: a width the model's dynamic dimension allows gives twice
    the rows), not a broken executor: as with any refused input, the batch's
    requests run again one by one, those the model answers with their rows are
    answered, and the others get INVALID_ARGUMENT saying so. Rebuilding the
    executor would change nothing, and counting it as the worker's failure let one
    client take the model out of the rotation.
    """


def _checked(result: BatchResult, rows: int) -> BatchResult:
    """Answers are sliced out of the outputs by row: any other length would misroute them."""
    for name, array in result.outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise OutputRowsError(
                f"its output '{name}' came out with shape {list(array.shape)} for {rows} "
                f"row(s) of input; a batching model's outputs must have its input's rows "
                f"first")
    return result


def _set_result(future: asyncio.Future[WorkerInfo], value: WorkerInfo) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future[WorkerInfo], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
