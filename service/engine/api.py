"""The one seam between the protocol side and the engine: plain data in, plain data out.

The protocol side (the gRPC frontends, Prometheus metrics, the CLI) speaks to the
engine (repository, batchers, scheduler, workers, the GPU) through `Engine` and
nothing else: it never holds a live model, worker or future of the engine. Two
homes implement it, as vLLM's engine clients do:

- `engine.local.LocalEngine`: the engine in this process (one process serves
  everything; the fastest path at low concurrency).
- `engine.remote.RemoteEngine`: the engine in another process, reached over
  `service.ipc` (descriptors over a Unix socket, tensor bytes in shared memory),
  so that N frontend processes share one engine and its batches.

Everything here is immutable data that can cross a process boundary as it is:
numbers, strings, tuples, frozen dataclasses, numpy arrays, and references into
shared-memory regions (`RegionRef`). Times are on the serving clock
(`service.engine.timer.now`, CLOCK_MONOTONIC), which every process on the host shares,
so a deadline means the same instant in the frontend and in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.backends.base import ModelSpec
from service.config import ModelConfig
from service.engine.stats import DurationHistogram, Percentiles

# --- tensors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionRef:
    """Bytes of a registered shared-memory region: `byte_size` bytes from `offset`.

    The region is a client's (KServe's system or CUDA shared-memory extension, or
    trtserve.v1's equivalent) or a frontend process's own arena; the engine owns
    the registry and checks every reference against the region before use.
    """

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True)
class TensorIn:
    """One input of a request: its wire dtype name, full shape, and where its bytes are.

    `data` is an array already decoded (its shape and dtype match `shape` and
    `dtype`; BF16 travels as uint16) or a reference into a region, which the
    engine resolves into an array without copying where the region allows.
    """

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | RegionRef


@dataclass(frozen=True)
class InferRequest:
    """What a frontend asks of the engine for one request of one model."""

    model: str
    inputs: Mapping[str, TensorIn]
    # "" or the served version.
    version: str = ""
    # Outputs to return, in this order; empty: every output, in the model's order.
    outputs: Sequence[str] = ()
    # Outputs the engine writes into a region instead of returning them.
    output_regions: Mapping[str, RegionRef] = field(default_factory=dict)
    # Serving clock; None: no deadline.
    deadline: float | None = None


@dataclass(frozen=True)
class TensorOut:
    """One output of a result. `data` is the array, or where the engine wrote it."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | RegionRef


@dataclass(frozen=True)
class InferResult:
    model: str
    version: str
    # In the order asked for (or the model's order).
    outputs: Mapping[str, TensorOut]


# --- models ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchingDescription:
    """How the engine batches a model's requests (what KServe's ModelConfig reports)."""

    max_batch_size: int
    max_rows_per_request: int
    max_queue_delay_s: float
    preferred_batch_sizes: tuple[int, ...]
    max_queue_size: int


@dataclass(frozen=True)
class WorkerDescription:
    """Where one worker runs: one execution context on one stream, or one session."""

    index: int
    profile: int
    device: str


@dataclass(frozen=True)
class ModelDescription:
    """A served model as the protocol side sees it; unchanged while the model is loaded."""

    name: str
    version: str
    spec: ModelSpec
    config: ModelConfig
    batching: BatchingDescription
    workers: tuple[WorkerDescription, ...]


# --- statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class StageTotals:
    """Cumulative seconds of batch stages, as Triton's statistics count them."""

    count: int = 0
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0


@dataclass(frozen=True)
class CaptureFailure:
    batch_size: int
    reason: str


@dataclass(frozen=True)
class WorkerSnapshot:
    """One worker (one stream or session) at the moment of the snapshot."""

    index: int
    profile: int
    device: str
    stream: str
    stream_non_blocking: bool
    aux_streams: int
    min_batch_size: int
    max_batch_size: int
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


@dataclass(frozen=True)
class ModelSnapshot:
    name: str
    version: str
    ready: bool
    healthy_workers: int
    queue_depth: int
    in_flight: int
    counters: ModelCountersSnapshot
    workers: tuple[WorkerSnapshot, ...]


@dataclass(frozen=True)
class FrontendSnapshot:
    """One frontend process: what it has taken and what it holds now."""

    index: int
    pid: int
    requests: int
    in_flight: int
    cpu_s: float


@dataclass(frozen=True)
class StatsSnapshot:
    models: tuple[ModelSnapshot, ...]
    frontends: tuple[FrontendSnapshot, ...] = ()


# --- the engine ------------------------------------------------------------------------

# Called on the caller's event loop with (model name, serving) whenever a model's
# health changes; "" names the server as a whole.
HealthListener = Callable[[str, bool], None]


class Engine(Protocol):
    """What the protocol side may ask of the engine. Errors are service.errors types."""

    def models(self) -> Sequence[str]:
        """Names of the models served now."""
        ...

    def describe(self, model: str, version: str = "") -> ModelDescription:
        """The model's description; NotFound when it is not served (or not that version).

        Cheap and synchronous: frontends call it for every request.
        """
        ...

    def ready(self, model: str | None = None) -> bool:
        """Whether the model (None: the server, every model) accepts requests now."""
        ...

    async def infer(self, request: InferRequest) -> InferResult:
        """Run one request through the model's batcher; raises a ServeError for the client."""
        ...

    async def stats(self, model: str | None = None) -> StatsSnapshot:
        """Counters of one model (None: every model) and of the frontends."""
        ...

    def add_health_listener(self, listener: HealthListener) -> None:
        ...
