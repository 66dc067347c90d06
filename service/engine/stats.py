"""Usage counters for every worker (one stream or session) and every model.

All of it is owned by the event loop: workers report a finished batch with one
`call_soon_threadsafe` callback, and Stats reads on the same loop, so nothing
here needs a lock.
"""

from __future__ import annotations

import array
import bisect
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from trtserve.service.backends.base import WorkerInfo

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
    """Seconds in, microsecond percentiles out, over the last `window` samples.

    A ring of doubles that numpy reads in place, not a deque: every Stats call and
    metrics scrape summarizes each worker's windows on the engine's loop, and copying a
    deque of 4096 into numpy before the percentiles took 160 us a window on the 2-core
    machine, so a client calling Stats in a loop held the engine's loop far longer than
    one calling Infer. Adding to it costs what appending to the deque did (about 0.2 us
    a call there; a numpy array's item assignment took 0.37)."""

    def __init__(self, window: int = SAMPLE_WINDOW) -> None:
        self._ring = array.array("d", bytes(8 * window))
        self._window = window
        self.added = 0  # ever; the next sample goes to added % window
        self._summary: Percentiles | None = None  # of the window as it is now

    def add(self, seconds: float, count: int = 1) -> None:
        """`count` samples of `seconds` (a group's members share one wait)."""
        start = self.added % self._window
        if count == 1:
            self._ring[start] = seconds
        else:  # in at most two slices, not a Python loop on the engine's loop
            ring = np.frombuffer(self._ring, dtype=np.float64)
            n = min(count, self._window)
            first = min(n, self._window - start)
            ring[start:start + first] = seconds
            ring[:n - first] = seconds
        self.added += count
        self._summary = None

    def values(self) -> np.ndarray:
        """The window's samples (seconds), in no particular order: a view of the ring,
        valid until the next `add`."""
        return np.frombuffer(self._ring, dtype=np.float64)[:min(self.added, self._window)]

    def summary(self) -> Percentiles:
        if self._summary is None:
            self._summary = _percentiles(self.values())
        return self._summary


class Merged:
    """Percentiles over several windows together (a model's, over its workers'),
    computed again only once one of them has changed."""

    def __init__(self, windows: Sequence[Samples]) -> None:
        self._windows = windows
        self._seen: tuple[int, ...] = ()  # each window's `added` when last summarized
        self._summary = Percentiles()

    def summary(self) -> Percentiles:
        seen = tuple(w.added for w in self._windows)
        if seen != self._seen:
            values = [w.values() for w in self._windows]
            self._summary = _percentiles(np.concatenate(values) if values else np.empty(0))
            self._seen = seen
        return self._summary


def _percentiles(seconds: np.ndarray) -> Percentiles:
    if not len(seconds):
        return Percentiles()
    us = seconds * 1e6
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return Percentiles(len(us), float(us.mean()), float(p50), float(p90), float(p99))


class BusyWindow:
    """Busy intervals of one stream; utilization = busy time in the window / window.

    Reading it costs a few intervals, not the whole window: a Stats call or a metrics
    scrape runs on the engine's loop, and a busy worker adds thousands of intervals a
    second (a 60 s window held 120 thousand; summing them all took 3% of the engine
    loop's samples with Stats read every 0.2 s, py-spy on the H100 host)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._intervals: deque[tuple[float, float]] = deque()
        self._busy_s = 0.0  # the intervals' lengths, summed
        # The longest interval added: an interval that begins before a window's start
        # ends at most this long after it (ends come in order).
        self._longest_s = 0.0

    def add(self, end: float, busy_s: float) -> None:
        """An interval of `busy_s` ending at `end`, no earlier than the last one's end."""
        self._intervals.append((end - busy_s, end))
        self._busy_s += busy_s
        self._longest_s = max(self._longest_s, busy_s)
        self._forget(end)

    def _forget(self, now: float) -> None:
        horizon = now - self.window_s
        intervals = self._intervals
        while intervals and intervals[0][1] < horizon:
            begin, end = intervals.popleft()
            self._busy_s -= end - begin
        if not intervals:
            self._busy_s = 0.0  # no rounding left over

    def utilization(self, now: float, since: float) -> tuple[float, float]:
        """(utilization, window length actually covered) at `now`, which is no earlier than
        the last interval's end: the busy time of the intervals' parts inside the window."""
        self._forget(now)
        window = min(self.window_s, max(now - since, 1e-9))
        start = now - window
        busy = self._busy_s
        for begin, end in self._intervals:  # the parts before the window's start
            if end - start > self._longest_s:
                break
            if begin < start:
                busy -= min(end, start) - begin
        return min(max(busy, 0.0) / window, 1.0), window


# Upper bounds (seconds) of the cumulative latency histograms that Prometheus
# scrapes: 50 us to 10 s, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 2.5, 5.0, 10.0,
)


@dataclass
class DurationHistogram:
    """Cumulative (never windowed) counts of durations per bucket, and their sum.

    `counts[i]` holds observations in (bounds[i-1], bounds[i]]; the last entry
    holds those above every bound (Prometheus's +Inf bucket).
    """

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    sum_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float, count: int = 1) -> None:
        """`count` durations of `seconds` each (a group's members share one)."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += count
        self.sum_s += seconds * count

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> DurationHistogram:
        return DurationHistogram(self.bounds, list(self.counts), self.sum_s)


@dataclass(frozen=True)
class CaptureFailure:
    batch_size: int
    reason: str


@dataclass(frozen=True)
class StageTotals:
    """Cumulative seconds of a batch's stages, as Triton's statistics report them."""

    count: int = 0
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0

    def __add__(self, other: StageTotals) -> StageTotals:
        return StageTotals(self.count + other.count, self.input_s + other.input_s,
                           self.infer_s + other.infer_s, self.output_s + other.output_s)


class _StageSums:
    """The running sums behind a StageTotals: added to per batch, read as a snapshot."""

    __slots__ = ("count", "infer_s", "input_s", "output_s")

    def __init__(self) -> None:
        self.count = 0
        self.input_s = self.infer_s = self.output_s = 0.0

    def add(self, input_s: float, infer_s: float, output_s: float, n: int = 1) -> None:
        """Count `n` events that each took these times (n requests sharing one batch)."""
        self.count += n
        self.input_s += n * input_s
        self.infer_s += n * infer_s
        self.output_s += n * output_s

    def snapshot(self) -> StageTotals:
        return StageTotals(self.count, self.input_s, self.infer_s, self.output_s)


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker (one stream or session) at the moment of the snapshot.

    `in_flight` and `healthy` are the model's control state, read when the
    snapshot is taken; the rest is the worker's telemetry.
    """

    index: int
    # Where the worker runs (profile, device, stream, batch range), as it reported at start.
    info: WorkerInfo
    requests: int
    batches: int
    inferences: int
    errors: int
    rejected: int
    graph_launches: int
    plain_enqueues: int
    inline_batches: int
    rebuilds: int
    retries: int
    in_flight: int
    busy_s: float
    utilization: float
    window_s: float
    healthy: bool
    state: str
    retry_in_s: float
    last_error: str
    # rows -> batches of that size
    batch_sizes: Mapping[int, int]
    queue_time: Percentiles
    compute_time: Percentiles
    capture_failures: tuple[CaptureFailure, ...]
    queue_s_total: float
    stages: StageTotals
    request_stages: StageTotals
    stages_by_batch_size: Mapping[int, StageTotals]
    queue_histogram: DurationHistogram
    compute_histogram: DurationHistogram
    last_batch_unix_s: float


class WorkerStats:
    """One worker's stream (GPU) or session (CPU): what it has done, owned by the event loop.

    Where the worker runs is its `info` (set when it has started); whether it is
    in the rotation and what it has in flight is the model's to know, not
    telemetry's, and comes in when a snapshot is taken.
    """

    def __init__(self, index: int, window_s: float) -> None:
        self.index = index
        self.window_s = window_s
        self.info = WorkerInfo()
        self.requests = 0
        self.batches = 0
        self.inferences = 0
        self.errors = 0
        self.graph_launches = 0
        self.plain_enqueues = 0
        self.inline_batches = 0  # run on the event loop (inline_below_us)
        self.rebuilds = 0
        self.busy_s = 0.0
        self.last_error = ""
        # Requests whose input the backend refused (INVALID_ARGUMENT); not errors of the worker.
        self.rejected = 0
        # "serving", or out of the rotation: "backing_off" until the next rebuild, "rebuilding".
        self.state = "serving"
        # time.monotonic() of the next rebuild while backing off, else 0.
        self.retry_at_s = 0.0
        self.retries = 0  # rebuilds tried while out of the rotation
        self.histogram: Counter[int] = Counter()
        self.queue_time = Samples()
        self.compute_time = Samples()
        self.capture_failures: list[CaptureFailure] = []
        self.started = time.monotonic()
        # Cumulative totals (never windowed), for Prometheus counters and Triton statistics.
        self.queue_s_total = 0.0
        self.stages = _StageSums()
        self.stages_by_batch_size: dict[int, _StageSums] = {}
        # Stages counted once per request (each request of a batch spent the batch's
        # times), as Triton's inference_stats count them; `stages` counts per batch.
        self.request_stages = _StageSums()
        self.queue_histogram = DurationHistogram()
        self.compute_histogram = DurationHistogram()
        # Wall clock (seconds since the epoch) when the last successful batch finished.
        self.last_batch_unix_s = 0.0
        self.busy = BusyWindow(window_s)

    def started_on(self, info: WorkerInfo) -> None:
        """The worker has started: where it runs, and the graphs it could not capture."""
        self.info = info
        for bucket, reason in info.capture_failures:
            self.record_capture_failure(bucket, reason)

    def record_queue(self, seconds: float, count: int = 1) -> None:
        """`count` requests (a group's members) that waited `seconds` in the queue: the
        per-request figures (KServe's queue count, the Prometheus histogram) count each."""
        self.queue_time.add(seconds, count)
        self.queue_s_total += seconds * count
        self.queue_histogram.observe(seconds, count)

    def record_batch(self, rows: int, requests: int, compute_s: float,
                     graph_launch: bool | None, input_s: float = 0.0,
                     output_s: float = 0.0) -> None:
        self.stages.add(input_s, compute_s, output_s)
        self.request_stages.add(input_s, compute_s, output_s, n=requests)
        self.compute_histogram.observe(compute_s)
        self.last_batch_unix_s = time.time()  # a timestamp for clients, not a duration
        by_size = self.stages_by_batch_size.get(rows)
        if by_size is None:
            by_size = self.stages_by_batch_size[rows] = _StageSums()
        by_size.add(input_s, compute_s, output_s)
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

    def retry_in_s(self) -> float:
        """Seconds until the next rebuild of a worker out of the rotation (0: none due)."""
        return max(0.0, self.retry_at_s - time.monotonic()) if self.retry_at_s else 0.0

    def record_capture_failure(self, batch_size: int, reason: str) -> None:
        if not any(f.batch_size == batch_size for f in self.capture_failures):
            self.capture_failures.append(CaptureFailure(batch_size, reason))

    def utilization(self) -> tuple[float, float]:
        return self.busy.utilization(time.monotonic(), self.started)

    def snapshot(self, in_flight: int, healthy: bool) -> WorkerSnapshot:
        utilization, window = self.utilization()
        return WorkerSnapshot(
            index=self.index, info=self.info, requests=self.requests, batches=self.batches,
            inferences=self.inferences, errors=self.errors, rejected=self.rejected,
            graph_launches=self.graph_launches, plain_enqueues=self.plain_enqueues,
            inline_batches=self.inline_batches, rebuilds=self.rebuilds, retries=self.retries,
            in_flight=in_flight, busy_s=self.busy_s, utilization=utilization, window_s=window,
            healthy=healthy, state=self.state, retry_in_s=self.retry_in_s(),
            last_error=self.last_error, batch_sizes=dict(self.histogram),
            queue_time=self.queue_time.summary(), compute_time=self.compute_time.summary(),
            capture_failures=tuple(self.capture_failures), queue_s_total=self.queue_s_total,
            stages=self.stages.snapshot(), request_stages=self.request_stages.snapshot(),
            stages_by_batch_size={size: sums.snapshot() for size, sums
                                  in sorted(self.stages_by_batch_size.items())},
            queue_histogram=self.queue_histogram.copy(),
            compute_histogram=self.compute_histogram.copy(),
            last_batch_unix_s=self.last_batch_unix_s)


@dataclass
class ModelCounters:
    """What happens to a model's requests before and around the workers."""

    requests: int = 0  # accepted into the queue
    errors: int = 0
    # End-to-end time inside the server (queue + execution) of answered requests.
    success: int = 0
    success_s: float = 0.0
    # Accepted requests that ended in an error (a failed batch, a deadline passed).
    failure: int = 0
    failure_s: float = 0.0
    # End-to-end durations of answered requests, for Prometheus.
    success_histogram: DurationHistogram = field(default_factory=DurationHistogram)
    rejected_queue_full: int = 0
    deadline_exceeded: int = 0
    cancelled: int = 0
    # Shared memory (engine/regions.py): tensor bytes read from and written into
    # clients' regions instead of crossing gRPC; tensor copies the executors did not
    # make (an input bound by address or copied once straight from the region, an
    # output written straight into its region); tensors copied through host memory
    # on the way to or from a region (a CUDA region on the CPU backend, an output
    # the executor could not place, copied into its region afterwards).
    shm_input_bytes: int = 0
    shm_output_bytes: int = 0
    copies_avoided: int = 0
    host_copies: int = 0
    # Batches with shared-memory tensors, by how the executor ran them
    # (BatchResult.io_path: "bound", "copied").
    io_paths: Counter[str] = field(default_factory=Counter)
    # Requests the engine process read together and queued as one (engine/groups.py):
    # the groups, and the requests in them (also counted in `requests`).
    groups: int = 0
    grouped_requests: int = 0

    def snapshot(self) -> ModelCountersSnapshot:
        return ModelCountersSnapshot(
            requests=self.requests, errors=self.errors, success=self.success,
            success_s=self.success_s, failure=self.failure, failure_s=self.failure_s,
            success_histogram=self.success_histogram.copy(),
            rejected_queue_full=self.rejected_queue_full,
            deadline_exceeded=self.deadline_exceeded, cancelled=self.cancelled,
            shm_input_bytes=self.shm_input_bytes, shm_output_bytes=self.shm_output_bytes,
            copies_avoided=self.copies_avoided, host_copies=self.host_copies,
            io_paths=dict(self.io_paths), groups=self.groups,
            grouped_requests=self.grouped_requests)


@dataclass(frozen=True)
class ModelCountersSnapshot:
    requests: int
    errors: int
    success: int
    success_s: float
    failure: int
    failure_s: float
    success_histogram: DurationHistogram
    rejected_queue_full: int
    deadline_exceeded: int
    cancelled: int
    shm_input_bytes: int = 0
    shm_output_bytes: int = 0
    copies_avoided: int = 0
    host_copies: int = 0
    io_paths: Mapping[str, int] = field(default_factory=dict)
    groups: int = 0
    grouped_requests: int = 0
