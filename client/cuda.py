"""Checked cuda-python calls: the runtime module and the `(err, *values)` unwrapping.

cuda-python returns `(err, *results)` from every call; `check` unwraps that and
raises `CudaError` carrying the error's name (`cudaErrorInvalidValue`), so no
call's status can be dropped. The client's CUDA shared-memory regions and the
server's TensorRT executor both call CUDA through these.

cuda-python is imported on first use, so this module imports without it.
"""

from __future__ import annotations

import functools
import types
from typing import Any


class CudaError(RuntimeError):
    """A CUDA runtime call failed. `name` is CUDA's error name, `call` what was called."""

    def __init__(self, call: str, name: str, code: int | None = None) -> None:
        super().__init__(f"{call} failed: {name}")
        self.call = call
        self.name = name
        self.code = code


@functools.cache
def runtime_module() -> types.ModuleType:
    """cuda-python's runtime API: `cuda.bindings.runtime`, or `cuda.cudart` before 12.6."""
    try:
        from cuda.bindings import runtime

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[attr-defined,unused-ignore]
    except ImportError as err:
        raise RuntimeError(
            "cuda-python is not installed; TensorRT serving and CUDA shared-memory "
            "regions need it: pip install cuda-python"
        ) from err
    module: types.ModuleType = cudart
    return module


def error_name(err: Any) -> str:
    """CUDA's name for an error code, e.g. 'cudaErrorInvalidValue'."""
    rt = runtime_module()
    try:
        status, name = rt.cudaGetErrorName(err)
    except (ValueError, TypeError):  # not a code cuda-python knows: say what it was
        return f"cudaError({int(err)})"
    if status != rt.cudaError_t.cudaSuccess:
        return f"cudaError({int(err)})"
    return name.decode() if isinstance(name, bytes) else str(name)


def check(result: tuple[Any, ...], call: str) -> Any:
    """Unwrap a cuda-python result `(err, *values)`.

    Returns None, the single value, or a tuple of values; raises CudaError naming
    the call and the CUDA error otherwise.
    """
    err, *values = result
    if err != runtime_module().cudaError_t.cudaSuccess:
        raise CudaError(call, error_name(err), int(err))
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)
