"""A request waiting for execution, and a batch of them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np

Outputs = dict[str, np.ndarray]


@dataclass(eq=False)
class Request:
    inputs: dict[str, np.ndarray]
    rows: int
    # Non-batch dimensions of every input; only requests with equal keys share a batch.
    shape_key: tuple[tuple[int, ...], ...]
    arrival: float  # serving clock (service.engine.timer.now)
    deadline: float | None  # serving clock; None: no deadline
    future: asyncio.Future[Outputs]

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


@dataclass(eq=False)
class Batch:
    requests: list[Request] = field(default_factory=list)
    rows: int = 0

    @property
    def shape_key(self) -> tuple[tuple[int, ...], ...] | None:
        return self.requests[0].shape_key if self.requests else None

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
        names = self.requests[0].inputs
        return {name: [r.inputs[name] for r in self.requests] for name in names}
