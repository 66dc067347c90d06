"""A request waiting for execution, and a batch of them.

A batch is merged from its requests here (`Batch.inputs`, what the executor
runs) and its outputs split back into each request's here (`Batch.split`); a
request's future is completed only here (`Request.answer`, `Request.fail`), so
that the batcher and the model never race to complete one twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from trtserve.service.backends.base import Targets
from trtserve.service.errors import ServeError

log = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]
# Non-batch dimensions of every input; only requests with equal keys share a batch.
ShapeKey = tuple[tuple[int, ...], ...]


class Validated(NamedTuple):
    """What validation found of a request: its rows, and the key of batches it may join."""

    rows: int
    shape_key: ShapeKey


@dataclass(eq=False, slots=True)
class Request:
    inputs: dict[str, np.ndarray]
    rows: int
    shape_key: ShapeKey
    arrival: float  # serving clock (trtserve.client.timer.now)
    deadline: float | None  # serving clock; None: no deadline
    future: asyncio.Future[Outputs]
    # Outputs the executor writes straight into the caller's memory (a region's).
    targets: Targets = field(default_factory=dict)
    # In a batch handed to a worker and not yet done: the executor may read its inputs
    # and write its targets, whether or not the request has been answered or cancelled.
    running: bool = False
    # What gives the caller's memory back once the running batch is done (after_batch).
    _after_batch: Callable[[], None] | None = None
    # Called once, at once, when the future is done through `answer`, `fail` or `cancel`
    # (ModelRuntime.submit): no done callback of the future, which costs a loop
    # callback per request. Who sets it cancels through `cancel`, not the future.
    on_settled: Callable[[Request], None] | None = field(default=None, repr=False)
    # The clients' requests this one carries: more than 1 for a group, requests of
    # equal shapes that the engine process read together and queued as one
    # (engine/groups.py), `members` giving each one's rows, in order.
    count: int = 1
    members: tuple[int, ...] = ()
    # A group's inputs left in its members' memory (an arena's ranges), member by
    # member: `inputs` then only describes them (dtype and stacked shape, no data),
    # and the executor gathers these parts into its buffer, the one copy they need.
    parts: Mapping[str, list[np.ndarray]] | None = None
    # Members given up by their clients while the group went on (counted as such,
    # not as answered): cancelled, and those of them past their own deadline.
    members_cancelled: int = 0
    members_expired: int = 0

    def after_batch(self, callback: Callable[[], None]) -> None:
        """Call `callback` once no batch uses this request's memory: now, unless its
        batch is running (then when the model sees that batch done). Once per request."""
        if self.running:
            self._after_batch = callback
        else:
            callback()

    def batch_done(self) -> None:
        """Its batch has finished on the worker (answered, failed or not): nothing reads
        its inputs or writes its targets any more."""
        self.running = False
        callback, self._after_batch = self._after_batch, None
        if callback is not None:
            callback()

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def answered(self) -> bool:
        """Answered, failed, or cancelled by its caller (whose handler has gone)."""
        return self.future.done()

    def answer(self, outputs: Outputs | MemberOutcomes) -> None:
        """Give the request its outputs, unless it already has its answer or was cancelled
        (a group's members run one by one: `MemberOutcomes`, only the engine process's
        host reads those, through `Submitted.member_tensors`)."""
        if not self.future.done():
            self.future.set_result(outputs)  # type: ignore[arg-type]
            self._settled()

    def fail(self, error: BaseException) -> None:
        """Give the request its error, unless it already has its answer or was cancelled."""
        if not self.future.done():
            self.future.set_exception(error)
            self._settled()

    def cancel(self) -> None:
        """The caller gave up: the request ends CancelledError, unless it has its answer."""
        if not self.future.done():
            self.future.cancel()
            self._settled()

    def _settled(self) -> None:
        callback, self.on_settled = self.on_settled, None
        if callback is None:
            return
        try:
            callback(self)
        except Exception:
            # It runs inside whatever answered the request (a batch's completion, the
            # batcher): the rest of that batch must still be answered, the worker freed.
            log.exception("settling a request failed")


class MemberOutcomes(list[Outputs | ServeError]):
    """A group's answer when its members ran one by one (its batch's input was refused):
    each member's own outputs or error, in order, as each would have got alone."""


@dataclass(eq=False, slots=True)
class Batch:
    requests: list[Request] = field(default_factory=list)
    rows: int = 0
    # Set by the model at dispatch: not predicted quick (ModelRuntime.hold_s).
    slow: bool = False

    @property
    def shape_key(self) -> ShapeKey | None:
        return self.requests[0].shape_key if self.requests else None

    @property
    def count(self) -> int:
        """The clients' requests in the batch (a group counts its members)."""
        return sum(r.count for r in self.requests)

    def add(self, request: Request) -> None:
        self.requests.append(request)
        self.rows += request.rows

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Full input shapes of the batch, as the executor will see them."""
        first = self.requests[0]
        if len(self.requests) == 1:
            # A request alone runs as given: also right for a model that does not
            # batch, whose shapes may have no batch dimension at all.
            return {name: a.shape for name, a in first.inputs.items()}
        return {name: (self.rows, *a.shape[1:]) for name, a in first.inputs.items()}

    def inputs(self) -> dict[str, list[np.ndarray]]:
        """Each input's parts, request by request: the executor gathers them into its buffer."""
        names = self.requests[0].inputs
        return {name: [part for r in self.requests
                       for part in (r.parts[name] if r.parts and name in r.parts
                                    else (r.inputs[name],))] for name in names}

    def targets(self) -> list[Targets] | None:
        """Each request's output targets, in order; None when no request has any."""
        if not any(r.targets for r in self.requests):
            return None
        return [r.targets for r in self.requests]

    def split(self, outputs: Outputs, batching: bool,
              placed: Mapping[tuple[int, str], np.ndarray] | None = None
              ) -> Iterator[tuple[Request, Outputs]]:
        """Each request with its rows of the batch's outputs (views, no copy), in order.

        A model that does not batch runs one request per batch, and that request
        gets the outputs as produced (their first dimension need not be rows).
        `placed`: outputs the executor wrote into a request's target, by (request
        index, name); the request gets those instead of its rows of `outputs`.
        """
        placed = placed or {}
        if not batching:
            yield self.requests[0], {**outputs, **{name: array for (_, name), array
                                                   in placed.items()}}
            return
        offset = 0
        for index, request in enumerate(self.requests):
            end = offset + request.rows
            yield request, {name: placed.get((index, name), array[offset:end])
                            for name, array in outputs.items()}
            offset = end
