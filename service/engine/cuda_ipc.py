"""CUDA IPC for CUDA shared-memory regions: the calls only a GPU can run.

A client exports device memory with cudaIpcGetMemHandle and sends the 64-byte
handle; the engine opens it with cudaIpcOpenMemHandle (a handle of the engine's
own process is refused by CUDA: the client must be another process) and closes
it on unregister. `CudaIpc` is the interface the region registry uses, so tests
without a GPU substitute a host-memory double (tests/doubles/cuda_ipc.py).
"""

from __future__ import annotations

import ctypes
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
