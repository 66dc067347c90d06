"""Usage counters for every worker (one stream or session) and every model.

All of it is owned by the event loop: workers report a finished batch with one
`call_soon_threadsafe` callback, and Stats reads on the same loop, so nothing
here needs a lock.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np

# Percentiles are over the most recent samples; a bounded window keeps memory
# flat under any load and makes the numbers describe the present.
SAMPLE_WINDOW = 4096


@dataclass(frozen=True)
class Percentiles:
    count: int = 0
    mean_us: float = 0.0
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0


class Samples:
    """Seconds in, microsecond percentiles out."""

    def __init__(self, window: int = SAMPLE_WINDOW) -> None:
        self._values: deque[float] = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self._values.append(seconds)

    def extend(self, values: Samples) -> None:
        self._values.extend(values._values)

    def summary(self) -> Percentiles:
        if not self._values:
            return Percentiles()
        us = np.fromiter(self._values, dtype=np.float64) * 1e6
        p50, p90, p99 = np.percentile(us, [50, 90, 99])
        return Percentiles(len(us), float(us.mean()), float(p50), float(p90), float(p99))


class BusyWindow:
    """Busy intervals of one stream; utilization = busy time in the window / window."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._intervals: deque[tuple[float, float]] = deque()

    def add(self, end: float, busy_s: float) -> None:
        self._intervals.append((end - busy_s, end))
        self._forget(end)

    def _forget(self, now: float) -> None:
        horizon = now - self.window_s
        while self._intervals and self._intervals[0][1] < horizon:
            self._intervals.popleft()

    def utilization(self, now: float, since: float) -> tuple[float, float]:
        """(utilization, window length actually covered) at `now`."""
        self._forget(now)
        window = min(self.window_s, max(now - since, 1e-9))
        start = now - window
        busy = sum(min(end, now) - max(begin, start) for begin, end in self._intervals
                   if end > start)
        return min(busy / window, 1.0), window


@dataclass
class CaptureFailure:
    batch_size: int
    reason: str


@dataclass
class StageTotals:
    """Cumulative seconds of a batch's stages, as Triton's statistics report them."""

    count: int = 0
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0

    def add(self, input_s: float, infer_s: float, output_s: float) -> None:
        self.count += 1
        self.input_s += input_s
        self.infer_s += infer_s
        self.output_s += output_s


@dataclass
class WorkerStats:
    """One worker's stream (GPU) or session (CPU)."""

    index: int
    window_s: float
    profile: int = 0
    device: str = "cpu"
    stream: str = ""
    stream_non_blocking: bool = False
    aux_streams: int = 0
    min_batch_size: int = 1
    max_batch_size: int = 1
    requests: int = 0
    batches: int = 0
    inferences: int = 0
    errors: int = 0
    graph_launches: int = 0
    plain_enqueues: int = 0
    rebuilds: int = 0
    in_flight: int = 0
    busy_s: float = 0.0
    healthy: bool = True
    last_error: str = ""
    histogram: Counter[int] = field(default_factory=Counter)
    queue_time: Samples = field(default_factory=Samples)
    compute_time: Samples = field(default_factory=Samples)
    capture_failures: list[CaptureFailure] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    # Cumulative totals (never windowed), for Prometheus counters and Triton statistics.
    queue_s_total: float = 0.0
    stages: StageTotals = field(default_factory=StageTotals)
    stages_by_batch_size: dict[int, StageTotals] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.busy = BusyWindow(self.window_s)

    def record_queue(self, seconds: float) -> None:
        self.queue_time.add(seconds)
        self.queue_s_total += seconds

    def record_batch(self, rows: int, requests: int, compute_s: float,
                     graph_launch: bool | None, input_s: float = 0.0,
                     output_s: float = 0.0) -> None:
        self.stages.add(input_s, compute_s, output_s)
        self.stages_by_batch_size.setdefault(rows, StageTotals()).add(input_s, compute_s,
                                                                      output_s)
        self.batches += 1
        self.requests += requests
        self.inferences += rows
        self.histogram[rows] += 1
        self.compute_time.add(compute_s)
        self.busy_s += compute_s
        self.busy.add(time.monotonic(), compute_s)
        if graph_launch is True:
            self.graph_launches += 1
        elif graph_launch is False:
            self.plain_enqueues += 1

    def record_failure(self, message: str) -> None:
        self.errors += 1
        self.last_error = message

    def record_capture_failure(self, batch_size: int, reason: str) -> None:
        if not any(f.batch_size == batch_size for f in self.capture_failures):
            self.capture_failures.append(CaptureFailure(batch_size, reason))

    def utilization(self) -> tuple[float, float]:
        return self.busy.utilization(time.monotonic(), self.started)


@dataclass
class ModelCounters:
    """What happens to a model's requests before and around the workers."""

    requests: int = 0  # accepted into the queue
    errors: int = 0
    # End-to-end time inside the server (queue + execution) of answered requests.
    success: int = 0
    success_s: float = 0.0
    failure_s: float = 0.0
    rejected_queue_full: int = 0
    deadline_exceeded: int = 0
    cancelled: int = 0
