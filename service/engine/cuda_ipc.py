"""CUDA IPC for CUDA shared-memory regions: the calls only a GPU can run.

A client exports device memory with cudaIpcGetMemHandle and sends the 64-byte
handle; the engine opens it with cudaIpcOpenMemHandle (a handle of the engine's
own process is refused by CUDA: the client must be another process) and closes
it on unregister. `CudaIpc` is the interface the region registry uses, so tests
without a GPU substitute a host-memory double (tests/doubles/cuda_ipc.py).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

# sizeof(cudaIpcMemHandle_t)
CUDA_IPC_HANDLE_BYTES = 64


class CudaIpc(Protocol):
    """The CUDA runtime calls a CUDA region needs; `CudaRuntimeIpc` is the real one.

    Tests without a GPU substitute a host-memory double (tests/doubles).
    """

    def open(self, raw_handle: bytes, device_id: int) -> int:
        """Map a cudaIpcMemHandle_t exported by another process; returns the device pointer."""
        ...

    def close(self, pointer: int, device_id: int) -> None:
        ...

    def to_host(self, pointer: int, out: np.ndarray, device_id: int) -> None:
        """Copy `out.nbytes` bytes from `pointer` into the contiguous array `out`."""
        ...

    def to_device(self, pointer: int, array: np.ndarray, device_id: int) -> None:
        """Copy the contiguous array into device memory at `pointer`."""
        ...


class CudaRuntimeIpc:
    """cudaIpcOpenMemHandle and cudaMemcpy through cuda-python, every call checked."""

    def _rt(self) -> Any:
        from trtserve.service.backends.tensorrt.cuda import runtime_module

        return runtime_module()

    def _device(self, device_id: int) -> None:
        from trtserve.service.backends.tensorrt.cuda import check

        check(self._rt().cudaSetDevice(device_id), "cudaSetDevice")

    def open(self, raw_handle: bytes, device_id: int) -> int:
        from trtserve.service.backends.tensorrt.cuda import check

        rt = self._rt()
        self._device(device_id)
        handle = rt.cudaIpcMemHandle_t()
        # cuda-python 13 exposes the 64-byte struct only through its address.
        ctypes.memmove(handle.getPtr(), raw_handle, CUDA_IPC_HANDLE_BYTES)
        pointer = check(rt.cudaIpcOpenMemHandle(handle, rt.cudaIpcMemLazyEnablePeerAccess),
                        "cudaIpcOpenMemHandle")
        return int(pointer)

    def close(self, pointer: int, device_id: int) -> None:
        from trtserve.service.backends.tensorrt.cuda import check

        self._device(device_id)
        check(self._rt().cudaIpcCloseMemHandle(pointer), "cudaIpcCloseMemHandle")

    def to_host(self, pointer: int, out: np.ndarray, device_id: int) -> None:
        from trtserve.service.backends.tensorrt.cuda import check

        rt = self._rt()
        self._device(device_id)
        check(rt.cudaMemcpy(out.ctypes.data, pointer, out.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy D2H")

    def to_device(self, pointer: int, array: np.ndarray, device_id: int) -> None:
        from trtserve.service.backends.tensorrt.cuda import check

        rt = self._rt()
        self._device(device_id)
        check(rt.cudaMemcpy(pointer, array.ctypes.data, array.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy H2D")


class HostPinner(Protocol):
    """Page-locks host memory the engine maps (cudaHostRegister), so that a TensorRT
    executor's H2D and D2H copies read and write it directly (DMA, asynchronous)
    instead of through the driver's own staging buffer. `CudaHostPinner` is the real
    one; tests substitute a double (tests/doubles/cuda_ipc.py)."""

    def register(self, address: int, nbytes: int) -> None:
        """Page-lock `nbytes` from `address`; raises when CUDA refuses."""
        ...

    def unregister(self, address: int) -> None:
        """Undo `register` (before the memory is unmapped)."""
        ...


class CudaHostPinner:
    """cudaHostRegister / cudaHostUnregister through cuda-python, every call checked."""

    def register(self, address: int, nbytes: int) -> None:
        from trtserve.service.backends.tensorrt.cuda import check, runtime_module

        rt = runtime_module()
        # Portable: pinned for every CUDA context, whichever device a model runs on.
        check(rt.cudaHostRegister(address, nbytes, rt.cudaHostRegisterPortable),
              "cudaHostRegister")

    def unregister(self, address: int) -> None:
        from trtserve.service.backends.tensorrt.cuda import check, runtime_module

        check(runtime_module().cudaHostUnregister(address), "cudaHostUnregister")


class PinOnce:
    """One mapping's page-lock (cudaHostRegister): tried once, on the first request for a
    TensorRT model; a refusal is logged once and copies stay pageable. `unpin` before
    unmapping: CUDA must not keep a mapping that is gone."""

    def __init__(self, what: str, log: logging.Logger) -> None:
        self._what = what
        self._log = log
        self._pinned: tuple[HostPinner, int] | None = None
        self._tried = False

    @property
    def pinned(self) -> bool:
        return self._pinned is not None

    def pin(self, pinner: HostPinner, locate: Callable[[], tuple[int, int]]) -> None:
        """Pin the (address, bytes) that `locate` gives, unless tried before."""
        if self._tried:
            return
        self._tried = True
        address, nbytes = locate()
        if pin_quietly(pinner, address, nbytes, self._what, self._log):
            self._pinned = (pinner, address)

    def unpin(self) -> None:
        if self._pinned is not None:
            pinner, address = self._pinned
            self._pinned = None
            unpin_quietly(pinner, address, self._what, self._log)


def pin_quietly(pinner: HostPinner, address: int, nbytes: int, what: str,
                log: logging.Logger) -> bool:
    """Pin, or say in one log line why not and carry on with pageable copies."""
    try:
        pinner.register(address, nbytes)
    except Exception as err:  # CudaError, or no CUDA at all: pageable copies still work
        log.warning("%s: cannot pin %d bytes with cudaHostRegister (%s); host copies of it "
                    "stay pageable", what, nbytes, _reason(err))
        return False
    return True


def unpin_quietly(pinner: HostPinner, address: int, what: str, log: logging.Logger) -> None:
    try:
        pinner.unregister(address)
    except Exception as err:  # the memory is unmapped next either way
        log.warning("%s: cudaHostUnregister failed (%s)", what, _reason(err))


def _reason(err: Exception) -> str:
    from trtserve.service.backends.tensorrt.cuda import CudaError

    return err.name if isinstance(err, CudaError) else f"{type(err).__name__}: {err}"
