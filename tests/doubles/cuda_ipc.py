"""A double of `trtserve.service.engine.cuda_ipc.CudaIpc` for machines without a GPU.

"Device memory exported by another process" is a host buffer here: a handle is
64 bytes naming one of the buffers the double exported, `open` gives its
address, and the copies are memmoves. It records every call, so a test can see
that a region was opened once, closed once, and copied as expected. Only the
registry's bookkeeping is tested with it; cudaIpcOpenMemHandle itself needs a GPU
(tests/gpu).
"""

from __future__ import annotations

import ctypes

import numpy as np

from trtserve.service.backends.tensorrt.cuda import CudaError


class HostCudaIpc:
    def __init__(self) -> None:
        self._exported: dict[bytes, np.ndarray] = {}
        # pointer -> times opened and not yet closed (CUDA counts them too).
        self.opened: dict[int, int] = {}
        self.calls: list[str] = []

    def export(self, byte_size: int) -> tuple[bytes, np.ndarray]:
        """A buffer "on the device" and its 64-byte handle."""
        buffer = np.zeros(byte_size, np.uint8)
        handle = len(self._exported).to_bytes(8, "little") + b"\x01" * 56
        self._exported[handle] = buffer
        return handle, buffer

    def open(self, raw_handle: bytes, device_id: int) -> int:
        self.calls.append("open")
        buffer = self._exported.get(raw_handle)
        if buffer is None:
            raise CudaError("cudaIpcOpenMemHandle", "cudaErrorInvalidResourceHandle", 400)
        pointer = buffer.ctypes.data
        self.opened[pointer] = self.opened.get(pointer, 0) + 1
        return pointer

    def close(self, pointer: int, device_id: int) -> None:
        self.calls.append("close")
        self.opened[pointer] -= 1
        if not self.opened[pointer]:
            del self.opened[pointer]

    def to_host(self, pointer: int, out: np.ndarray, device_id: int) -> None:
        self.calls.append("to_host")
        ctypes.memmove(out.ctypes.data, pointer, out.nbytes)

    def to_device(self, pointer: int, array: np.ndarray, device_id: int) -> None:
        self.calls.append("to_device")
        ctypes.memmove(pointer, array.ctypes.data, array.nbytes)
