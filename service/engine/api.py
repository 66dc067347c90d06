"""The one seam between the protocol side and the engine: plain data in, plain data out.

The protocol side (the gRPC frontends, Prometheus metrics, the CLI) speaks to the
engine (repository, batchers, scheduler, workers, the GPU) through `Engine` and
nothing else: it never holds a live model, worker or future of the engine. Two
homes implement it, as vLLM's engine clients do:

- `engine.local.LocalEngine`: the engine in this process (one process serves
  everything; the fastest path at low concurrency).
- `engine.remote.RemoteEngine`: the engine in another process, reached over
  `trtserve.service.ipc` (descriptors over a Unix socket, tensor bytes in shared memory),
  so that N frontend processes share one engine and its batches.

Everything here is data that can cross a process boundary as it is: numbers,
strings, tuples, frozen dataclasses (the snapshots' dicts and histograms are
copies the engine no longer touches), numpy arrays, and references into
shared-memory regions (`RegionRef`). Times are on the serving clock
(`now` here, CLOCK_MONOTONIC), which every process on the host shares,
so a deadline means the same instant in the frontend and in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from trtserve.client.timer import now
from trtserve.service import echo
from trtserve.service.backends.base import ModelSpec, WorkerInfo
from trtserve.service.config import ModelConfig
from trtserve.service.engine.stats import (
    CaptureFailure,
    DurationHistogram,
    ModelCountersSnapshot,
    Percentiles,
    StageTotals,
    WorkerSnapshot,
)
from trtserve.service.errors import NotFound, TensorError
from trtserve.service.limits import ByteBudgetSnapshot
from trtserve.service.tensors import TensorSpec

# The snapshots of telemetry are declared where the telemetry lives (engine/stats.py),
# so that no field is declared twice; they are part of this contract all the same.
__all__ = [
    "LOADING", "MODEL_VERSION", "READY", "UNAVAILABLE", "UNLOADING", "BatchingDescription",
    "ByteBudgetSnapshot", "CaptureFailure", "DurationHistogram", "Engine", "FrontendSnapshot",
    "HealthListener", "InferRequest", "InferResult", "ModelCountersSnapshot",
    "ModelDescription", "ModelSnapshot", "ModelSpec", "ModelState", "Percentiles", "RegionRef",
    "StageTotals", "StatsSnapshot", "StatsSource", "TensorIn", "TensorOut", "WorkerInfo",
    "WorkerSnapshot", "check_version", "now", "wanted_outputs",
]

# trtserve serves one version of each model. KServe clients may name it "1" or
# leave the version empty.
MODEL_VERSION = "1"


def check_version(model: str | None, version: str, served: str = MODEL_VERSION) -> None:
    """Refuse any version but the one served ("" asks for it too); `model` None: any model.

    One version of a model is served at a time: a reload serves the next version
    ("1", "2", ...) and a request naming an earlier one is NOT_FOUND, naming the
    version served now.
    """
    if version not in ("", served):
        shown = echo.text(version)
        if model is None:
            raise NotFound(f"no model has version '{shown}'; trtserve serves one version of "
                           "each model (leave the version empty)")
        raise NotFound(f"model '{echo.text(model)}' has no version '{shown}'; version "
                       f"'{served}' is served (or leave the version empty)")


def wanted_outputs(model: str, spec: ModelSpec, names: Sequence[str]) -> Sequence[TensorSpec]:
    """The outputs to answer with: those `names` asks for, in its order, else every one.

    A TensorError, before execution, for a named output that does not exist or
    is named twice. Each output once, as KServe does: the n+1st name of a model
    with n outputs is unknown or a repeat, so a long list is refused after n+1 names.
    """
    if not names:  # most requests: every output
        return spec.outputs
    wanted: list[TensorSpec] = []
    for name in names:
        tensor_spec = spec.output(name)
        if tensor_spec is None:
            raise TensorError(name, f"unknown output; model '{echo.text(model)}' gives "
                              f"{sorted(t.name for t in spec.outputs)}")
        if tensor_spec in wanted:
            raise TensorError(name, "requested more than once")
        wanted.append(tensor_spec)
    return wanted

# --- tensors ---------------------------------------------------------------------------

# Memory a caller lends the engine for one request (inputs viewing a region or an
# arena range, outputs the executor writes into a region) outlives the request when
# it ends while its batch still runs (cancelled on the device): the engine calls
# `keep()` then, and what it returns once that batch has finished, so that the
# caller frees, reuses or unregisters that memory only then.
Keep = Callable[[], Callable[[], None]]


@dataclass(frozen=True, slots=True)
class RegionRef:
    """Bytes of a registered shared-memory region: `byte_size` bytes from `offset`.

    The region is a client's (KServe's system or CUDA shared-memory extension, or
    trtserve.v1's equivalent) or a frontend process's own arena; the engine owns
    the registry and checks every reference against the region before use.
    """

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class TensorIn:
    """One input of a request: its wire dtype name, full shape, and where its bytes are.

    `data` is an array already decoded (its shape and dtype match `shape` and
    `dtype`; BF16 travels as uint16) or a reference into a region, which the
    engine resolves into an array without copying where the region allows.
    """

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | RegionRef


@dataclass(frozen=True, slots=True)
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
    # The caller's hook for memory it lent (see Keep): a frontend process's arena
    # ranges. Not data: never compared or sent.
    keep: Keep | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class TensorOut:
    """One output of a result. `data` is the array, or where the engine wrote it."""

    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray | RegionRef


@dataclass(frozen=True, slots=True)
class InferResult:
    model: str
    version: str
    # In the order asked for (or the model's order).
    outputs: Mapping[str, TensorOut]


# --- shared-memory regions ------------------------------------------------------------

# Kinds of shared-memory region.
SYSTEM = "system"  # a POSIX shared-memory object (shm_open key)
CUDA = "cuda"  # device memory exported with cudaIpcGetMemHandle


@dataclass(frozen=True)
class RegionStatus:
    """One registered region, as the status RPCs report it."""

    name: str
    kind: str  # "system" or "cuda"
    byte_size: int
    # System regions: the shared-memory key and the offset of the region in it.
    key: str = ""
    offset: int = 0
    # CUDA regions: the device the memory lives on.
    device_id: int = 0
    # Requests using the region now (queued or running).
    in_use: int = 0


@dataclass(frozen=True)
class RegionUsage:
    """What regions spared the wire, since the start."""

    regions: int
    mapped_bytes: int
    # Tensor bytes read from or written into regions: bytes that did not cross gRPC.
    input_bytes: int
    output_bytes: int
    # Inputs handed to the batch as views of the region (no copy at all); the bytes
    # path copies each input at least once out of its message.
    zero_copy_inputs: int
    # Tensors copied between host and device because the region and the backend
    # live on different sides (a CUDA region served by the CPU backend).
    host_copies: int


NO_REGIONS = RegionUsage(0, 0, 0, 0, 0, 0)


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
class ModelDescription:
    """A served model as the protocol side sees it; unchanged while the model is loaded."""

    name: str
    version: str
    spec: ModelSpec
    config: ModelConfig
    batching: BatchingDescription
    # Where each worker runs, by worker index.
    workers: tuple[WorkerInfo, ...]


# --- the model repository --------------------------------------------------------------

# A model's state in the repository, as KServe's RepositoryIndex (Triton) names them.
READY = "READY"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelState:
    """One model the repository knows: configured at start, or loaded at run time."""

    name: str
    # The version served now ("1", "2", ... one more for each load or reload that
    # succeeded); the last one served when the model is not loaded; "" if never loaded.
    version: str
    # READY (served), LOADING (its first load is running), UNLOADING, UNAVAILABLE.
    # A model being reloaded stays READY: its old version serves until the switch.
    state: str
    # The model file it is (or would be) loaded from.
    path: str
    # Why it is not READY ("unloaded", a load's error); "" when READY.
    reason: str = ""


# --- statistics ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSnapshot:
    name: str
    version: str
    ready: bool
    healthy_workers: int
    queue_depth: int
    # Batches handed to workers and not finished.
    in_flight: int
    counters: ModelCountersSnapshot
    workers: tuple[WorkerSnapshot, ...]
    # Over the recent requests (batches) of every worker together.
    queue_time: Percentiles
    compute_time: Percentiles


@dataclass(frozen=True)
class FrontendSnapshot:
    """One frontend process: what it has taken and what it holds now."""

    index: int
    pid: int
    requests: int
    in_flight: int
    cpu_s: float
    # Frames that carried its requests (requests / request_frames: per frame).
    request_frames: int = 0
    # Files it holds open, its gRPC connections among them (each holds one): a frontend
    # near server.grpc_max_connections closes one more connection as it opens.
    open_files: int = 0


_NO_BUDGET = ByteBudgetSnapshot(held_bytes=0, limit_bytes=0, refused=0)


@dataclass(frozen=True)
class StatsSnapshot:
    models: tuple[ModelSnapshot, ...]
    frontends: tuple[FrontendSnapshot, ...] = ()
    # The server-wide budget of request bytes in flight (service/limits.py).
    request_bytes: ByteBudgetSnapshot = _NO_BUDGET
    # What shared-memory regions spared the wire (engine/regions.py).
    shared_memory: RegionUsage = NO_REGIONS


# --- the engine ------------------------------------------------------------------------

# Called on the caller's event loop with (model name, serving) whenever a model's
# health changes; "" names the server as a whole.
HealthListener = Callable[[str, bool], None]


class StatsSource(Protocol):
    """What Prometheus reads of an engine: its stats and its models' descriptions.

    The engine itself, or the engine process's host of frontends, which adds the
    frontends' rows to the stats."""

    def describe(self, model: str, version: str = "") -> ModelDescription: ...

    async def stats(self, model: str | None = None) -> StatsSnapshot: ...


class Engine(Protocol):
    """What the protocol side may ask of the engine. Errors are trtserve.service.errors types."""

    def models(self) -> Sequence[str]:
        """Names of the models served now."""
        ...

    def describe(self, model: str, version: str = "") -> ModelDescription:
        """The model's description; NotFound when it is not served (or not that version).

        Cheap and synchronous: frontends call it for every request.
        """
        ...

    def ready(self, model: str | None = None) -> bool:
        """Whether the model (None: every model) accepts requests now, with a worker in the
        rotation. An unknown model is not ready (no error), as Triton answers."""
        ...

    async def infer(self, request: InferRequest) -> InferResult:
        """Run one request through the model's batcher; raises a ServeError for the client.

        Outputs are checked (wanted_outputs) before anything runs; validation comes
        before the server's byte budget (INVALID_ARGUMENT before RESOURCE_EXHAUSTED).
        """
        ...

    async def stats(self, model: str | None = None) -> StatsSnapshot:
        """Counters of one model (None: every model; NotFound for one not served), of the
        frontends and of the request byte budget, read at one moment."""
        ...

    def add_health_listener(self, listener: HealthListener) -> None:
        """Call `listener(model, serving)` when a model loses its last healthy worker
        (False) or one rejoins a model that had none (True), and when a model is
        loaded or reloaded (True, if a worker is healthy) or unloaded (False)."""
        ...

    # Model control (server.model_control; PermissionDenied when it is off). Each
    # returns the model's state once the operation is done; LoadFailed when a load
    # fails, with what served before still serving.

    async def repository_index(self) -> Sequence[ModelState]:
        """Every model the repository knows, loaded or not, by name."""
        ...

    async def load_model(self, model: str, path: str = "") -> ModelState:
        """Load the model (from `path`, else its configured file); a model already
        loaded is reloaded, as Triton does."""
        ...

    async def unload_model(self, model: str) -> ModelState:
        """Stop serving the model: new requests NOT_FOUND, accepted ones answered,
        then its workers stop and its memory is freed."""
        ...

    async def reload_model(self, model: str, path: str = "") -> ModelState:
        """Serve a new version of a loaded model, built beside the old one; the switch
        is one step; the old version answers what it accepted, then stops."""
        ...

    # Shared-memory regions live in the engine (engine.regions), so that every
    # frontend process sees the same ones; frontends forward these calls.

    async def register_system_region(self, name: str, key: str, offset: int,
                                     byte_size: int) -> None:
        """Map `byte_size` bytes from `offset` of the POSIX shared-memory object `key`.

        InvalidArgument when the key cannot be opened or is too small; AlreadyExists
        for a name in use; ResourceExhausted past server.shared_memory's limits.
        """
        ...

    async def register_cuda_region(self, name: str, raw_handle: bytes, device_id: int,
                                   byte_size: int) -> None:
        """Open a cudaIpcMemHandle_t (64 raw bytes) of device memory on `device_id`."""
        ...

    async def unregister_region(self, name: str | None, kind: str | None = None) -> None:
        """Unregister a region (None or "": every region of `kind`; kind None: both kinds).

        FailedPrecondition while a request not yet answered uses it, or the batch of
        a request cancelled while it ran is not yet done; an unknown name is no error.
        """
        ...

    async def region_status(self, name: str | None, kind: str | None = None
                            ) -> tuple[RegionStatus, ...]:
        """Registered regions (one, or every one of `kind`); NotFound for an unknown name."""
        ...

