"""Round-robin over the workers whose profile can take the batch: idle ones first.

A worker may also hold one batch ahead, queued behind the one it runs, when the
batcher asks for it (`acquire(..., ahead=True)`, only for a batch that waiting
could not grow). That batch starts on the worker's thread the moment the one
before it ends. Otherwise the worker would sit idle until the event loop had seen
its batch finish and handed it the next: two passes of the loop, each about a
millisecond on a busy engine (docs/batching.md; measured in docs/processes-measured.md,
"Session 14": 7-12% more rows/s at 8 rows per request, where most batches
cannot grow before they are full).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class Schedulable(Protocol):
    @property
    def available(self) -> bool: ...

    def accepts(self, shapes: Mapping[str, tuple[int, ...]]) -> bool: ...


class Scheduler:
    """Owns how many batches each worker holds. Lives on the event loop; no locks."""

    def __init__(self, workers: Sequence[Schedulable]) -> None:
        self._workers = list(workers)
        self._held = [0] * len(self._workers)
        self._next = 0

    def acquire(self, shapes: Mapping[str, tuple[int, ...]], ahead: bool = False) -> int | None:
        """Index of the next idle worker able to run these shapes, now holding the batch.

        With `ahead`, when none is idle, the next busy one with no batch ahead yet.
        """
        found = self._find(shapes, 0)
        if found is None and ahead:
            found = self._find(shapes, 1)
        if found is not None:
            self._held[found] += 1
            self._next = (found + 1) % len(self._workers)
        return found

    def _find(self, shapes: Mapping[str, tuple[int, ...]], held: int) -> int | None:
        n = len(self._workers)
        for step in range(n):
            i = (self._next + step) % n
            worker = self._workers[i]
            if self._held[i] == held and worker.available and worker.accepts(shapes):
                return i
        return None

    def release(self, index: int) -> None:
        """Worker `index` has finished one of the batches it held (none held: no-op)."""
        self._held[index] = max(0, self._held[index] - 1)

    def can_ever_run(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return any(w.available and w.accepts(shapes) for w in self._workers)
