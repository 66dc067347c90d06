"""held_gil: the executor's quick CUDA calls through the driver library, GIL held.

The driver library exists only on a GPU machine; there the GPU suite (tests/gpu)
runs these calls for real (graph launches, and Stats' busy time read from the
elapsed times checked against the kernels' own clocks). Here a double stands in
for the library: a namespace of Python functions with ctypes' calling shape.
"""

from __future__ import annotations

import ctypes
import types

import pytest

from trtserve.client.cuda import CudaError
from trtserve.service.backends.tensorrt import held_gil
from trtserve.service.backends.tensorrt.cuda import CudaRuntime

CUDA_ERROR_INVALID_HANDLE = 400


class Handle:
    """A cuda-python handle: converts to the pointer it wraps."""

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __int__(self) -> int:
        return self.pointer


def driver_double(elapsed_ms: float = 0.25, launch_code: int = 0, v2: bool = True
                  ) -> tuple[types.SimpleNamespace, list[tuple[object, ...]]]:
    """libcuda's three entry points as Python functions, recording their arguments."""
    calls: list[tuple[object, ...]] = []

    def launch(graph_exec: int, stream: int) -> int:
        calls.append(("cuGraphLaunch", graph_exec, stream))
        return launch_code

    def elapsed(out: object, start: int, end: int) -> int:
        calls.append(("elapsed", start, end))
        out._obj.value = elapsed_ms  # type: ignore[attr-defined]  # byref's target
        return 0

    def error_name(code: int, out: object) -> int:
        target = out._obj  # type: ignore[attr-defined]
        target.value = b"CUDA_ERROR_INVALID_HANDLE" if code == CUDA_ERROR_INVALID_HANDLE \
            else None
        return 0 if target.value else 1

    lib = types.SimpleNamespace(cuGraphLaunch=launch, cuGetErrorName=error_name)
    setattr(lib, "cuEventElapsedTime_v2" if v2 else "cuEventElapsedTime", elapsed)
    return lib, calls


def test_launch_passes_the_handles_pointer_and_the_stream() -> None:
    lib, calls = driver_double()
    held_gil.HeldGilCalls(lib).graph_launch(Handle(0x1234), 77)  # type: ignore[arg-type]
    assert calls == [("cuGraphLaunch", 0x1234, 77)]


def test_elapsed_reads_milliseconds_as_seconds_from_the_v2_entry_point() -> None:
    lib, calls = driver_double(elapsed_ms=1.5)
    seconds = held_gil.HeldGilCalls(lib).event_elapsed_s(Handle(1), Handle(2))  # type: ignore[arg-type]
    assert seconds == pytest.approx(1.5e-3)
    assert calls == [("elapsed", 1, 2)]


def test_an_older_driver_without_the_v2_entry_point_uses_the_first() -> None:
    lib, calls = driver_double(elapsed_ms=0.5, v2=False)
    calls_ = held_gil.HeldGilCalls(lib)  # type: ignore[arg-type]
    assert calls_.event_elapsed_s(Handle(3), Handle(4)) == pytest.approx(0.5e-3)
    assert calls == [("elapsed", 3, 4)]


def test_a_failed_call_raises_naming_the_call_and_the_drivers_error() -> None:
    lib, _ = driver_double(launch_code=CUDA_ERROR_INVALID_HANDLE)
    with pytest.raises(CudaError) as caught:
        held_gil.HeldGilCalls(lib).graph_launch(Handle(1), 0)  # type: ignore[arg-type]
    assert caught.value.call == "cuGraphLaunch"
    assert caught.value.name == "CUDA_ERROR_INVALID_HANDLE"
    assert caught.value.code == CUDA_ERROR_INVALID_HANDLE


def test_an_error_the_driver_cannot_name_is_named_by_its_code() -> None:
    lib, _ = driver_double(launch_code=999)
    with pytest.raises(CudaError, match=r"CUresult\(999\)"):
        held_gil.HeldGilCalls(lib).graph_launch(Handle(1), 0)  # type: ignore[arg-type]


def test_without_a_driver_library_every_call_stays_with_cuda_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_library(name: str) -> ctypes.CDLL:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(held_gil, "ENABLED", True)
    monkeypatch.setattr(held_gil, "_loaded", held_gil._NOT_LOADED)
    monkeypatch.setattr(held_gil.ctypes, "PyDLL", no_library)
    assert held_gil.load() is None
    assert CudaRuntime(0)._held is None


def test_while_off_no_driver_library_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    lib, _ = driver_double()

    def library(name: str) -> types.SimpleNamespace:
        return lib

    monkeypatch.setattr(held_gil, "ENABLED", False)
    monkeypatch.setattr(held_gil, "_loaded", held_gil._NOT_LOADED)
    monkeypatch.setattr(held_gil.ctypes, "PyDLL", library)
    assert held_gil.load() is None
    monkeypatch.setattr(held_gil, "ENABLED", True)
    assert isinstance(held_gil.load(), held_gil.HeldGilCalls)


def test_the_runtime_sends_launches_and_elapsed_reads_to_the_held_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lib, calls = driver_double(elapsed_ms=2.0)
    monkeypatch.setattr(held_gil, "ENABLED", True)
    monkeypatch.setattr(held_gil, "_loaded", held_gil.HeldGilCalls(lib))  # type: ignore[arg-type]
    runtime = CudaRuntime(0)
    runtime.graph_launch(Handle(9), 5)  # type: ignore[arg-type]
    assert runtime.event_elapsed_s(Handle(6), Handle(7)) == pytest.approx(2e-3)  # type: ignore[arg-type]
    assert calls == [("cuGraphLaunch", 9, 5), ("elapsed", 6, 7)]
