"""Round-robin over idle workers whose profile can take the batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class Schedulable(Protocol):
    @property
    def available(self) -> bool: ...

    def accepts(self, shapes: Mapping[str, tuple[int, ...]]) -> bool: ...


class Scheduler:
    """Owns which workers are busy. Lives on the event loop; no locks."""

    def __init__(self, workers: Sequence[Schedulable]) -> None:
        self._workers = list(workers)
        self._busy = [False] * len(self._workers)
        self._next = 0

    def acquire(self, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
        """Index of the next idle worker able to run these shapes, now marked busy."""
        n = len(self._workers)
        for step in range(n):
            i = (self._next + step) % n
            worker = self._workers[i]
            if not self._busy[i] and worker.available and worker.accepts(shapes):
                self._busy[i] = True
                self._next = (i + 1) % n
                return i
        return None

    def release(self, index: int) -> None:
        self._busy[index] = False

    def can_ever_run(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return any(w.available and w.accepts(shapes) for w in self._workers)
