"""What every backend provides: a model's description and one executor per worker.

An executor is the backend's half of a worker: it is created, used and closed
by that worker's thread alone (for TensorRT it owns an execution context, a
CUDA stream and buffers), so it needs no locks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from trtserve.service.errors import ConfigError

if TYPE_CHECKING:
    from trtserve.service.config import ModelConfig
from trtserve.service.tensors import TensorSpec

# A shape range of one input for one profile: (min, opt, max) full shapes.
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class ProfileSpec:
    """One optimization profile (ONNX Runtime has a single implicit one)."""

    index: int
    ranges: Mapping[str, ShapeRange] = field(default_factory=dict)

    @property
    def min_batch(self) -> int:
        return max((r[0][0] for r in self.ranges.values() if r[0]), default=1)

    @property
    def max_batch(self) -> int | None:
        return min((r[2][0] for r in self.ranges.values() if r[2]), default=None)

    def accepts(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        """Whether every given input shape lies within this profile's range."""
        for name, shape in shapes.items():
            rng = self.ranges.get(name)
            if rng is None:
                continue
            lo, _, hi = rng
            if len(shape) != len(lo) or any(
                d < a or d > b for d, a, b in zip(shape, lo, hi, strict=True)
            ):
                return False
        return True


@dataclass(frozen=True)
class ModelSpec:
    """What a loaded model takes and gives.

    With `batching`, every input and output carries the batch in dimension 0
    and requests are stacked along it. Without (Triton's max_batch_size 0),
    shapes are full shapes, each request runs alone as given and its outputs
    come back as the model produces them.
    """

    backend: str  # "onnxruntime" or "tensorrt"
    platform: str  # Triton-style: "onnxruntime_onnx" or "tensorrt_plan"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    min_batch_size: int = 1
    profiles: tuple[ProfileSpec, ...] = (ProfileSpec(0),)
    batching: bool = True
    # The executors read inputs from and write outputs to device memory (TensorRT):
    # CUDA-region tensors stay on the device (DeviceTensor, DeviceTarget) and system
    # regions are page-locked for them (engine/regions.py).
    device_io: bool = False

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


@dataclass(frozen=True)
class WorkerInfo:
    """What Stats shows about where a worker runs."""

    profile: int = 0
    device: str = "cpu"
    stream: str = ""
    stream_non_blocking: bool = False
    aux_streams: int = 0
    min_batch_size: int = 1
    max_batch_size: int = 1
    # The executor may run a batch on another thread than the one that built it
    # while that thread is idle (an ONNX Runtime session; never a TensorRT
    # context, whose stream and graphs belong to the worker's thread).
    runs_on_any_thread: bool = False
    # (batch bucket, reason) of each CUDA graph that could not be captured when
    # the worker started; later batches report any found after.
    capture_failures: tuple[tuple[int, str], ...] = ()


class DeviceTensor(np.ndarray):
    """A tensor in device memory, as a numpy array of its dtype and shape holding no data.

    Carries the device pointer where the bytes are (`pointer`, on CUDA device
    `device_id`). Validation reads its dtype and shape like any array's; only an
    executor that reads device memory (TensorRT) is ever given one, and it reads
    `pointer`, never the array's (zero-strided, all-zero) elements.
    """

    pointer: int
    device_id: int


class PinnedHostArray(np.ndarray):
    """A host array over page-locked memory the engine registered with cudaHostRegister
    (a system region, a frontend's input arena): a TensorRT executor copies a request
    alone in its batch to the device straight from it, without a staging copy."""


class RegionArray(np.ndarray):
    """A read-only host array viewing a client's system shared-memory region (no copy).

    How an executor tells a region's tensor from one that crossed the wire: one it
    reads where it lies (a request alone in its batch) counts as a copy avoided in
    `BatchResult.copies_avoided`; one it gathers into a batch buffer with other
    requests' rows is copied once, and counts as copied.
    """


class PinnedRegionArray(RegionArray, PinnedHostArray):
    """A view of a system region the engine page-locked (both of the above)."""


def device_tensor(pointer: int, device_id: int, dtype: np.dtype,
                  shape: tuple[int, ...]) -> DeviceTensor:
    """A DeviceTensor of `shape` and `dtype` at `pointer` (no host memory behind it)."""
    placeholder = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape=shape,
                                                  strides=(0,) * len(shape), writeable=False)
    tensor = placeholder.view(DeviceTensor)
    tensor.pointer = pointer
    tensor.device_id = device_id
    return tensor


def nbytes_of(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class HostTarget:
    """A writable host buffer an output's bytes go to (a system region's range, as uint8).

    `pinned`: registered with cudaHostRegister, so a D2H copy can write it directly.
    """

    buffer: np.ndarray
    pinned: bool = False

    @property
    def byte_size(self) -> int:
        return int(self.buffer.nbytes)

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """The first bytes of the buffer as `shape` of `dtype` (the caller checked the size)."""
        return self.buffer[:nbytes_of(shape, dtype)].view(dtype).reshape(shape)


@dataclass(frozen=True)
class DeviceTarget:
    """Device memory an output's bytes go to (a CUDA region's range)."""

    pointer: int
    byte_size: int
    device_id: int

    def array(self, dtype: np.dtype, shape: tuple[int, ...]) -> DeviceTensor:
        return device_tensor(self.pointer, self.device_id, dtype, shape)


# Where one request's outputs go, by output name; outputs not named are returned.
OutputTarget = HostTarget | DeviceTarget
Targets = Mapping[str, OutputTarget]


@dataclass
class BatchResult:
    """Outputs of one batch (exactly `rows` rows each) and how it ran."""

    # A request's rows of an output it was given a target for are in `placed`,
    # not here (here they may hold anything).
    outputs: dict[str, np.ndarray]
    # Time the device spent on the batch: CUDA events on the GPU, wall on the CPU.
    compute_s: float
    # True: a CUDA graph was launched; False: plain enqueue; None: not a GPU backend.
    graph_launch: bool | None = None
    # (batch bucket, reason) when a CUDA graph could not be captured for this batch.
    capture_failure: tuple[int, str] | None = None
    # Breakdown for Triton-style statistics; zero where the backend can't tell.
    input_s: float = 0.0
    output_s: float = 0.0
    # (request index in the batch, output name) -> that request's output, written by
    # the executor into the target it was given (a view of it, or a DeviceTensor).
    placed: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    # Tensor copies the executor did not make because it read an input where it lay
    # or wrote an output where it goes (bound by address, or one copy straight
    # between device and the caller's memory instead of through a staging buffer).
    copies_avoided: int = 0
    # How the batch's shared-memory tensors ran, for tests and logs: "" (none given),
    # "bound" (each read or written where it lies, no copy: device addresses set on the
    # context, or ONNX Runtime given the region's memory), "copied" (at least one copied
    # once between the caller's memory and the executor's buffers).
    io_path: str = ""


class Executor(Protocol):
    info: WorkerInfo

    def run(self, inputs: Mapping[str, Sequence[np.ndarray]], rows: int,
            targets: Sequence[Targets] | None = None) -> BatchResult:
        """Run one batch. `inputs[name]` are the requests' arrays, concatenated on axis 0.

        `targets`: one mapping per request, in order, naming the outputs that go to a
        destination of the caller's (each at least the output's size); those go into
        `BatchResult.placed`. An executor that cannot use a target returns the output
        as usual and the caller copies it (a DeviceTarget on a CPU backend).
        """
        ...

    def close(self) -> None: ...


# Called on the worker's own thread, so that thread owns what it creates.
ExecutorFactory = Callable[[], Executor]


@dataclass
class LoadedModel:
    spec: ModelSpec
    # One factory per worker; the worker calls it again to rebuild after a failure.
    factories: list[ExecutorFactory]
    # Released when the model unloads (e.g. the deserialized TensorRT engine).
    close: Callable[[], None] = lambda: None


def decide_batching(mode: bool | str, tensors: Sequence[TensorSpec], model: str,
                    why_not: str = "") -> bool:
    """Whether a model batches, from its `batching` key and its tensors' shapes.

    A model can batch when every input and output has a dynamic first dimension
    (and `why_not`, a backend's own reason, is empty). "auto" batches where it
    can; False never does; True where it cannot is a config error naming the
    tensor that stops it.
    """
    if mode is False:
        return False
    blocking = next((t for t in tensors if not t.shape or t.shape[0] != -1), None)
    if blocking is None and not why_not:
        return True
    if mode is True:
        reason = why_not
        if blocking is not None:
            reason = (f"tensor '{blocking.name}' has shape {list(blocking.shape)}, not a "
                      "dynamic first dimension")
        raise ConfigError(f"models.{model}.batching: got true, but the model cannot batch: "
                          f"{reason}")
    return False


def check_unbatched_config(config: ModelConfig) -> None:
    """Refuse batch settings for a model that does not batch (they could never apply)."""
    if config.max_batch_size > 1:
        raise ConfigError(f"models.{config.name}.max_batch_size: got {config.max_batch_size}, "
                          "but the model does not batch (each request runs alone, as given); "
                          "leave it at 0")
