"""What every backend provides: a model's description and one executor per worker.

An executor is the backend's half of a worker: it is created, used and closed
by that worker's thread alone (for TensorRT it owns an execution context, a
CUDA stream and buffers), so it needs no locks.
"""

from __future__ import annotations

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


@dataclass
class BatchResult:
    """Outputs of one batch (exactly `rows` rows each) and how it ran."""

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


class Executor(Protocol):
    info: WorkerInfo

    def run(self, inputs: Mapping[str, Sequence[np.ndarray]], rows: int) -> BatchResult:
        """Run one batch. `inputs[name]` are the requests' arrays, concatenated on axis 0."""
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
