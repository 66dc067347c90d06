"""The TensorRT Python module, whichever is installed, and helpers shared by build and execution.

trtserve runs with NVIDIA's `tensorrt` package (TensorRT 10 and later) or with
`tensorrt_rtx`, whose Python API is the same for everything used here. Code imports
the library through `import_tensorrt()` at run time and is typed against `tensorrt`
(tensorrt-stubs) for mypy.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import tensorrt as trt

INSTALL_HINT = "pip install 'trtserve[tensorrt]'"

_gc_pauses = 0
_gc_enabled_before = True
_gc_pauses_lock = threading.Lock()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off while TensorRT may call our logger.

    TensorRT calls the logger while holding a lock of its own. A collection that
    starts inside that callback (any allocation can start one) and frees another
    TensorRT object caught in a reference cycle (a Runtime, a Builder) takes the
    same lock again, and the thread deadlocks: seen in the test suite, a Builder
    being created logged while the collector freed an old IRuntime. Reference
    counting still frees everything else meanwhile. Nested and concurrent pauses
    are counted; the collector comes back with the last one.
    """
    global _gc_pauses, _gc_enabled_before
    with _gc_pauses_lock:
        if _gc_pauses == 0:
            _gc_enabled_before = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_pauses_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_enabled_before:
                gc.enable()

# TensorRT DataType names -> numpy dtypes. Keyed by the enum member's name so the
# table holds for either library without importing one.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    # numpy has no bfloat16: BF16 tensors travel as their raw 16-bit patterns in a
    # uint16 array. Callers that need values convert (e.g. with ml_dtypes).
    "BF16": np.dtype(np.uint16),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}


@functools.cache
def import_tensorrt() -> types.ModuleType:
    """Return the `tensorrt` module if installed, else `tensorrt_rtx`.

    Raises RuntimeError saying how to install TensorRT if neither is importable.
    """
    errors = []
    for name in ("tensorrt", "tensorrt_rtx"):
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            errors.append(f"{name}: {err}")
            continue
        # tensorrt-stubs ships a `tensorrt/` folder of .pyi files only; Python imports
        # it as an empty namespace package. Only a module with a Builder is the library.
        if hasattr(module, "Builder"):
            return module
        errors.append(f"{name}: found only type stubs, not the library")
    raise RuntimeError(
        "TensorRT is not installed (" + "; ".join(errors) + "). "
        f"Install it on a machine with an NVIDIA GPU with: {INSTALL_HINT}"
    )


def library_info(trt_module: types.ModuleType | None = None) -> tuple[str, str]:
    """(module name, version) of the TensorRT library in use, e.g. ('tensorrt_rtx', '1.7.1.116')."""
    module = trt_module or import_tensorrt()
    return module.__name__, str(getattr(module, "__version__", "unknown"))


def gpu_present() -> bool:
    """Whether the NVIDIA kernel driver exposes a device node here (Linux).

    A cheap check made before anything that needs a GPU, so that a CPU-only machine
    gets a plain "needs a GPU" message instead of a CUDA error code.
    """
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def numpy_dtype(dtype: trt.DataType) -> np.dtype:
    """The numpy dtype for a TensorRT DataType. BF16 maps to uint16 (raw bit patterns)."""
    try:
        return _NUMPY_DTYPES[dtype.name]
    except KeyError:
        raise TypeError(
            f"TensorRT data type {dtype.name} has no numpy equivalent; "
            f"supported: {', '.join(_NUMPY_DTYPES)}"
        ) from None


Shape = tuple[int, ...]


def dims_tuple(dims: trt.Dims) -> Shape:
    """A TensorRT Dims as a tuple of ints (-1 for a dynamic dimension)."""
    # Indexing, not iteration: Dims is typed with __getitem__/__len__ only.
    return tuple(dims[i] for i in range(len(dims)))


@dataclass(frozen=True)
class IOTensor:
    """One input or output of an engine or network. -1 in `shape` marks a dynamic dimension."""

    name: str
    mode: Literal["input", "output"]
    dtype: np.dtype
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "mode": self.mode,
            "dtype": str(self.dtype),
            "shape": list(self.shape),
        }


def engine_io(engine: trt.ICudaEngine) -> list[IOTensor]:
    """The engine's IO tensors in binding order."""
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        # Compare by name: the enum class differs between tensorrt and tensorrt_rtx.
        mode = engine.get_tensor_mode(name).name
        if mode not in ("INPUT", "OUTPUT"):
            continue
        tensors.append(
            IOTensor(
                name=name,
                mode="input" if mode == "INPUT" else "output",
                dtype=numpy_dtype(engine.get_tensor_dtype(name)),
                shape=dims_tuple(engine.get_tensor_shape(name)),
            )
        )
    return tensors


def network_io(network: trt.INetworkDefinition) -> list[IOTensor]:
    """The IO tensors of a parsed network: what the engine will have, known before it is built."""
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    return [
        IOTensor(t.name, "input", numpy_dtype(t.dtype), dims_tuple(t.shape)) for t in inputs
    ] + [IOTensor(t.name, "output", numpy_dtype(t.dtype), dims_tuple(t.shape)) for t in outputs]


def profile_shapes(
    engine: trt.ICudaEngine, profile_index: int
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """(min, opt, max) shape of every input tensor in one optimization profile."""
    if not 0 <= profile_index < engine.num_optimization_profiles:
        raise ValueError(
            f"profile_index {profile_index} out of range: the engine has "
            f"{engine.num_optimization_profiles} optimization profiles"
        )
    shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
    for tensor in engine_io(engine):
        # Shape-tensor inputs have profile *values*, not shapes; the service feeds
        # only execution tensors, so they are left out here.
        if tensor.mode != "input" or engine.is_shape_inference_io(tensor.name):
            continue
        low, opt, high = engine.get_tensor_profile_shape(tensor.name, profile_index)
        shapes[tensor.name] = (dims_tuple(low), dims_tuple(opt), dims_tuple(high))
    return shapes
