"""Doubles for testing the TensorRT executor without a GPU or TensorRT.

- `HostCudaRuntime`: a double of `trtserve.service.backends.tensorrt.cuda.CudaRuntime`.
  "Device" memory is host memory, so pointers are real addresses; stream operations run at once,
  except on a stream being captured, where they are recorded into the graph and
  run each time the graph is launched. It keeps every live resource, so a test can
  see that `close()` freed them all.
- `RecordingEngine` / `RecordingContext`: a double of a TensorRT engine and its
  execution contexts with one input `x` and one output `y` of shape [batch, features],
  computing y = 2x + 1 through the "device" buffers (2x goes through the context's
  device-memory block). Every call of every context is appended to one log shared
  with the runtime double, in order.
"""

from __future__ import annotations

import ctypes
import enum
import itertools
import math
import threading
import time
import types
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trtserve.service.backends.tensorrt.cuda import CudaError

# A held kernel (RecordingEngine.hold) gives up after this long: a test that forgets
# to let it go fails (a violation) instead of hanging.
HOLD_LIMIT_S = 60.0


@dataclass(frozen=True)
class Call:
    """One recorded call: who ('cuda' or 'context N'), what, and its arguments."""

    who: str
    method: str
    args: tuple[Any, ...] = ()


def _floats(ptr: int, count: int) -> np.ndarray:
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(ptr))


@dataclass
class _Graph:
    ops: list[Callable[[], object]] = field(default_factory=list)


class HostCudaRuntime:
    """CudaRuntime's interface over host memory, recording every call in `log`."""

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self.log: list[Call] = []
        self.streams: dict[int, bool] = {}  # live stream -> created non-blocking
        self.device_buffers: dict[int, np.ndarray] = {}
        self.host_buffers: dict[int, np.ndarray] = {}
        self.events: dict[int, float | None] = {}  # live event -> time recorded
        self.graphs: dict[int, _Graph] = {}
        self.graph_execs: dict[int, _Graph] = {}
        self.capturing: dict[int, _Graph] = {}
        # Set to a CUDA error name to make every end_capture fail with it.
        self.fail_end_capture: str | None = None
        # Calls (method names) refused while a stream is captured, as CUDA refuses some.
        self.refuse_in_capture: set[str] = set()
        self.capture_problems: list[str] = []
        self._handles = itertools.count(0x7000, 0x10)
        # "Device" memory the runtime did not allocate but may copy to and from (a CUDA
        # region opened through tests/doubles/cuda_ipc.py): pointer -> bytes.
        self.foreign: dict[int, int] = {}
        self.copies: Counter[str] = Counter(h2d=0, d2h=0, d2d=0)

    def adopt(self, pointer: int, nbytes: int) -> None:
        """Let copies reach `nbytes` of "device" memory at `pointer` made elsewhere."""
        self.foreign[pointer] = nbytes

    def _record(self, method: str, *args: Any) -> None:
        self.log.append(Call("cuda", method, args))

    def enqueue(self, stream: int, op: Callable[[], object]) -> None:
        """Run `op` now, or record it if `stream` is being captured."""
        if stream not in self.streams:
            raise CudaError("enqueue", "cudaErrorInvalidResourceHandle")
        graph = self.capturing.get(stream)
        if graph is not None:
            graph.ops.append(op)
        else:
            op()

    def set_device(self) -> None:
        self._record("set_device", self.device)

    def stream_create(self) -> int:
        handle = next(self._handles)
        self.streams[handle] = True
        self._record("stream_create", handle)
        return handle

    def stream_destroy(self, stream: int) -> None:
        self._record("stream_destroy", stream)
        if self.streams.pop(stream, None) is None:
            raise CudaError("cudaStreamDestroy", "cudaErrorInvalidResourceHandle")

    def stream_synchronize(self, stream: int) -> None:
        self._record("stream_synchronize", stream)

    def stream_non_blocking(self, stream: int) -> bool:
        return self.streams[stream]

    def malloc(self, nbytes: int) -> int:
        buffer = np.zeros(max(nbytes, 1), dtype=np.uint8)
        ptr = buffer.ctypes.data
        self.device_buffers[ptr] = buffer
        self._record("malloc", ptr, nbytes)
        return ptr

    def free(self, ptr: int) -> None:
        self._record("free", ptr)
        if self.device_buffers.pop(ptr, None) is None:
            raise CudaError("cudaFree", "cudaErrorInvalidValue")

    def host_alloc(self, nbytes: int) -> np.ndarray:
        buffer = np.full(max(nbytes, 1), 0xAB, dtype=np.uint8)  # not zero: callers must clear
        self.host_buffers[buffer.ctypes.data] = buffer
        self._record("host_alloc", buffer.ctypes.data, nbytes)
        return buffer[:nbytes]

    def host_free(self, array: np.ndarray) -> None:
        self._record("host_free", array.ctypes.data)
        if self.host_buffers.pop(array.ctypes.data, None) is None:
            raise CudaError("cudaFreeHost", "cudaErrorInvalidValue")

    def _refuse_if_capturing(self, method: str, stream: int) -> None:
        if method in self.refuse_in_capture and stream in self.capturing:
            raise CudaError(method, "cudaErrorStreamCaptureUnsupported")

    def _check_device(self, ptr: int, nbytes: int) -> None:
        for base, buffer in self.device_buffers.items():
            if base <= ptr and ptr + nbytes <= base + buffer.nbytes:
                return
        for base, size in self.foreign.items():
            if base <= ptr and ptr + nbytes <= base + size:
                return
        raise CudaError("cudaMemcpyAsync", "cudaErrorInvalidValue")

    def memset_async(self, ptr: int, value: int, nbytes: int, stream: int) -> None:
        self._record("memset_async", ptr, value, nbytes, stream)
        self._check_device(ptr, nbytes)
        self.enqueue(stream, lambda: ctypes.memset(ptr, value, nbytes))

    def memcpy_h2d_async(self, dst: int, src: np.ndarray, nbytes: int, stream: int) -> None:
        self._record("memcpy_h2d_async", dst, nbytes, stream)
        self.copies["h2d"] += 1
        self._refuse_if_capturing("memcpy_h2d_async", stream)
        self._check_device(dst, nbytes)
        address = src.ctypes.data
        self.enqueue(stream, lambda: ctypes.memmove(dst, address, nbytes))

    def memcpy_d2h_async(self, dst: np.ndarray, src: int, nbytes: int, stream: int) -> None:
        self._record("memcpy_d2h_async", src, nbytes, stream)
        self.copies["d2h"] += 1
        self._refuse_if_capturing("memcpy_d2h_async", stream)
        self._check_device(src, nbytes)
        address = dst.ctypes.data
        self.enqueue(stream, lambda: ctypes.memmove(address, src, nbytes))

    def memcpy_d2d_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._record("memcpy_d2d_async", dst, src, nbytes, stream)
        self.copies["d2d"] += 1
        self._check_device(dst, nbytes)
        self._check_device(src, nbytes)
        self.enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))

    def event_create(self) -> int:
        handle = next(self._handles)
        self.events[handle] = None
        self._record("event_create", handle)
        return handle

    def event_destroy(self, event: int) -> None:
        self._record("event_destroy", event)
        del self.events[event]

    def event_record(self, event: int, stream: int, external: bool = False) -> None:
        self._record("event_record", event, stream, external)
        if stream in self.capturing and not external:
            # CUDA would turn it into a graph-internal dependency, which no one can wait on.
            self.capture_problems.append("event recorded in a capture without the external flag")

        def stamp() -> None:
            self.events[event] = time.perf_counter()

        self.enqueue(stream, stamp)

    def event_synchronize(self, event: int) -> None:
        self._record("event_synchronize", event)
        if self.events[event] is None:
            raise CudaError("cudaEventSynchronize", "cudaErrorInvalidResourceHandle")

    def event_elapsed_s(self, start: int, end: int) -> float:
        begin, finish = self.events[start], self.events[end]
        if begin is None or finish is None:
            raise CudaError("cudaEventElapsedTime", "cudaErrorInvalidResourceHandle")
        return finish - begin

    def begin_capture(self, stream: int) -> None:
        self._record("begin_capture", stream)
        if stream in self.capturing or not self.streams[stream]:
            # CUDA refuses to capture the legacy stream or work that syncs with it.
            raise CudaError("cudaStreamBeginCapture", "cudaErrorStreamCaptureUnsupported")
        self.capturing[stream] = _Graph()

    def end_capture(self, stream: int) -> int:
        self._record("end_capture", stream)
        graph = self.capturing.pop(stream)
        if self.fail_end_capture:
            raise CudaError("cudaStreamEndCapture", self.fail_end_capture)
        handle = next(self._handles)
        self.graphs[handle] = graph
        return handle

    def is_capturing(self, stream: int) -> bool:
        return stream in self.capturing

    def graph_instantiate(self, graph: int) -> int:
        self._record("graph_instantiate", graph)
        handle = next(self._handles)
        self.graph_execs[handle] = self.graphs[graph]
        return handle

    def graph_launch(self, graph_exec: int, stream: int) -> None:
        self._record("graph_launch", graph_exec, stream)
        for op in self.graph_execs[graph_exec].ops:
            self.enqueue(stream, op)

    def graph_exec_destroy(self, graph_exec: int) -> None:
        self._record("graph_exec_destroy", graph_exec)
        del self.graph_execs[graph_exec]

    def graph_destroy(self, graph: int) -> None:
        self._record("graph_destroy", graph)
        del self.graphs[graph]

    def clear_error(self) -> str | None:
        return None

    def live(self) -> dict[str, int]:
        """How many of each resource are still allocated."""
        return {
            "streams": len(self.streams),
            "device_buffers": len(self.device_buffers),
            "host_buffers": len(self.host_buffers),
            "events": len(self.events),
            "graphs": len(self.graphs),
            "graph_execs": len(self.graph_execs),
        }


# --- the TensorRT side ------------------------------------------------------------------


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(enum.Enum):
    FLOAT = 0


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


STATIC = ExecutionContextAllocationStrategy.STATIC

# What the executor reads from the TensorRT module (passed as `trt_module`).
trt_module = types.SimpleNamespace(
    ExecutionContextAllocationStrategy=ExecutionContextAllocationStrategy,
    TensorIOMode=TensorIOMode,
    DataType=DataType,
)


class RecordingEngine:
    """An engine double: x [batch, features] -> y = 2x + 1, one (min, opt, max) batch
    range per profile.

    With `static_shape`, x and y have that one shape and no dynamic dimension
    (an engine built without a batch dimension; () is a scalar), and every
    profile is that shape.

    Knobs a test sets: `profile_result` / `execute_result` (what those calls return),
    `capture_behaviour` ('ok', 'false': execute_async_v3 returns False while the
    stream is captured, 'raise': it raises), `hold` (an Event: while it is unset,
    every kernel waits for it before reading x and writing y, as a batch still on
    the device; `held` is set once one waits).
    """

    def __init__(
        self,
        cuda: HostCudaRuntime,
        features: int = 4,
        profiles: Sequence[tuple[int, int, int]] = ((1, 4, 8),),
        num_aux_streams: int = 0,
        static_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.cuda = cuda
        self.static_shape = static_shape
        self.log = cuda.log
        self.features = features
        self.profiles = list(profiles)
        self.num_aux_streams = num_aux_streams
        self.num_optimization_profiles = len(self.profiles)
        self.num_io_tensors = 2
        self.profile_result = True
        self.execute_result = True
        # Rows whose shape set_input_shape refuses although the profile covers them
        # (as TensorRT does for sizes a network cannot run).
        self.refused_rows: set[int] = set()
        # Rows whose shape set_input_shape takes but infer_shapes cannot resolve.
        self.unresolved_rows: set[int] = set()
        self.capture_behaviour = "ok"
        self.hold: threading.Event | None = None
        self.held = threading.Event()
        self.live_contexts: weakref.WeakSet[RecordingContext] = weakref.WeakSet()
        self.created = 0
        # What contexts saw that TensorRT would refuse or that would compute garbage.
        self.violations: list[str] = []

    def get_tensor_name(self, index: int) -> str:
        return ("x", "y")[index]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return TensorIOMode.INPUT if name == "x" else TensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> DataType:
        return DataType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.static_shape if self.static_shape is not None else (-1, self.features)

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        if self.static_shape is not None:
            return [self.static_shape] * 3
        return [(b, self.features) for b in self.profiles[profile]]

    def get_device_memory_size_for_profile_v2(self, profile: int) -> int:
        if self.static_shape is not None:
            return math.prod(self.static_shape) * 4
        return self.profiles[profile][2] * self.features * 4

    def create_execution_context(
        self, strategy: ExecutionContextAllocationStrategy = STATIC
    ) -> RecordingContext:
        context = RecordingContext(self, self.created)
        self.created += 1
        self.live_contexts.add(context)
        self.log.append(Call(context.who, "create", (strategy,)))
        # Observe (not manage) when the executor lets go of the context.
        weakref.finalize(context, self.log.append, Call(context.who, "released"))
        if strategy is not ExecutionContextAllocationStrategy.USER_MANAGED:
            self.violations.append(f"{context.who}: created with {strategy}")
        return context


class RecordingContext:
    def __init__(self, engine: RecordingEngine, index: int) -> None:
        self.engine = engine
        self.who = f"context {index}"
        self.memory: tuple[int, int] | None = None
        self.profile: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.aux_streams: list[int] | None = None

    def _record(self, method: str, *args: Any) -> None:
        self.engine.log.append(Call(self.who, method, args))

    def set_device_memory(self, ptr: int, size: int) -> None:
        self._record("set_device_memory", ptr, size)
        self.memory = (ptr, size)

    def set_optimization_profile_async(self, profile: int, stream: int) -> bool:
        self._record("set_optimization_profile_async", profile, stream)
        if not self.engine.profile_result:
            return False
        self.profile = profile
        self.shapes.clear()  # a profile change invalidates the input shapes
        return True

    def set_aux_streams(self, streams: list[int]) -> None:
        self._record("set_aux_streams", list(streams))
        self.aux_streams = list(streams)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self._record("set_tensor_address", name, ptr)
        self.addresses[name] = ptr
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self._record("set_input_shape", name, tuple(shape))
        if self.profile is None:
            self.engine.violations.append(f"{self.who}: set_input_shape before a profile")
            return False
        if self.engine.static_shape is not None:
            if tuple(shape) != self.engine.static_shape:
                return False
            self.shapes[name] = tuple(shape)
            return True
        low, _, high = self.engine.profiles[self.profile]
        if len(shape) != 2 or not low <= shape[0] <= high or shape[1] != self.engine.features:
            return False
        if shape[0] in self.engine.refused_rows:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def infer_shapes(self) -> list[str]:
        self._record("infer_shapes")
        if self.shapes.get("x", ())[:1] and self.shapes["x"][0] in self.engine.unresolved_rows:
            return ["y"]
        return [] if "x" in self.shapes else ["x"]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.static_shape is not None:
            return self.engine.static_shape
        rows = self.shapes["x"][0] if "x" in self.shapes else -1
        return (rows, self.engine.features)

    def execute_async_v3(self, stream: int) -> bool:
        cuda = self.engine.cuda
        capturing = cuda.is_capturing(stream)
        self._record("execute_async_v3", stream, capturing)
        problems = []
        if self.profile is None:
            problems.append("no profile")
        if self.memory is None:
            problems.append("no device memory")
        if set(self.addresses) != {"x", "y"}:
            problems.append(f"addresses set only for {sorted(self.addresses)}")
        if "x" not in self.shapes:
            problems.append("no input shape")
        if problems:
            self.engine.violations.append(f"{self.who}: execute_async_v3 with {problems}")
            return False
        if capturing and self.engine.capture_behaviour == "false":
            return False
        if capturing and self.engine.capture_behaviour == "raise":
            raise RuntimeError("the double refuses to be captured")
        if not self.engine.execute_result:
            return False
        assert self.memory is not None
        count = math.prod(self.shapes["x"]) if self.engine.static_shape is not None \
            else self.shapes["x"][0] * self.engine.features
        if count * 4 > self.memory[1]:
            self.engine.violations.append(f"{self.who}: device memory too small")
            return False
        x, y, scratch = self.addresses["x"], self.addresses["y"], self.memory[0]

        hold, held = self.engine.hold, self.engine.held

        def compute() -> None:
            if hold is not None:
                held.set()
                if not hold.wait(HOLD_LIMIT_S):
                    self.engine.violations.append(f"{self.who}: held past {HOLD_LIMIT_S} s")
            _floats(scratch, count)[:] = 2 * _floats(x, count)
            _floats(y, count)[:] = _floats(scratch, count) + 1

        cuda.enqueue(stream, compute)
        return True
