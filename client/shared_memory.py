"""Shared-memory regions on the client side: tensors that never cross gRPC.

A client on the server's host creates a region, writes inputs into numpy views
of it, registers it with the server (`Client.register_region`), and names it in
requests; the server reads the inputs from it and writes outputs into it.

    with Client(url) as c, SystemRegion.create(2 * nbytes) as region:
        c.register_region(region)
        x = region.array(np.float32, (1, 3, 640, 640))
        x[:] = image                                      # written once, in place
        out = c.infer("model", {"input": x},               # a view: sent as a reference
                      output_regions={"output": region.slot(nbytes, nbytes)})
        out["output"]                                      # a view of the region

`SystemRegion` is a POSIX shared-memory object (the same objects
tritonclient.utils.shared_memory makes, so either client's regions work with
either server). `CudaRegion` is device memory exported with cudaIpcGetMemHandle;
it needs cuda-python and a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import uuid
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, Self

import numpy as np

from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb


@dataclass(frozen=True)
class RegionSlot:
    """`byte_size` bytes from `offset` of the registered region `region`."""

    region: str
    offset: int
    byte_size: int

    def to_proto(self) -> pb.RegionRef:
        return pb.RegionRef(region=self.region, offset=self.offset, byte_size=self.byte_size)


@dataclass(frozen=True)
class RegionTensor:
    """An input already in a region (e.g. uploaded to a CudaRegion): where, and what."""

    slot: RegionSlot
    dtype: str  # wire name: "FP32", ...
    shape: tuple[int, ...]


class SystemRegion:
    """A POSIX shared-memory object this process created (and unlinks on close)."""

    kind = "system"

    def __init__(self, shm: shared_memory.SharedMemory, name: str, byte_size: int) -> None:
        self._shm = shm
        self.name = name
        self.byte_size = byte_size
        # shm_open key of the object, as the register RPCs take it.
        self.key = "/" + shm.name.lstrip("/")
        buffer = shm.buf
        assert buffer is not None, "a SharedMemory just opened has its buffer"
        self._base = np.frombuffer(buffer, dtype=np.uint8, count=byte_size)

    @classmethod
    def create(cls, byte_size: int, name: str = "") -> SystemRegion:
        """A new object of `byte_size` bytes; `name` (the region's) defaults to a unique one."""
        if byte_size <= 0:
            raise ValueError(f"byte_size must be more than 0, got {byte_size}")
        name = name or f"trtserve-{uuid.uuid4().hex[:16]}"
        shm = shared_memory.SharedMemory(create=True, size=byte_size)
        return cls(shm, name, byte_size)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def array(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A writable numpy view of the region (no copy), `offset` bytes in."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if offset < 0 or offset + count * dtype.itemsize > self.byte_size:
            raise ValueError(f"{count * dtype.itemsize} bytes at offset {offset} do not fit "
                             f"in region '{self.name}' of {self.byte_size} bytes")
        return self._base[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)

    def slot(self, offset: int, byte_size: int) -> RegionSlot:
        if offset < 0 or offset + byte_size > self.byte_size:
            raise ValueError(f"{byte_size} bytes at offset {offset} do not fit in region "
                             f"'{self.name}' of {self.byte_size} bytes")
        return RegionSlot(self.name, offset, byte_size)

    def slot_of(self, array: np.ndarray) -> RegionSlot | None:
        """Where `array` lies in this region (a contiguous view of it), else None."""
        if not array.flags.c_contiguous:
            return None
        base = self._base.ctypes.data
        start = array.ctypes.data - base
        if start < 0 or start + array.nbytes > self.byte_size:
            return None
        return RegionSlot(self.name, start, array.nbytes)

    def close(self) -> None:
        """Unlink and unmap the object (unregister it from the server first). Views
        still held keep the mapping alive until they go."""
        del self._base
        self._shm.unlink()
        with contextlib.suppress(BufferError):
            self._shm.close()


class CudaRegion:
    """Device memory (cudaMalloc) exported to the server with a CUDA IPC handle.

    Needs cuda-python and a GPU. Inputs are copied in with `upload`, outputs read
    with `download`; the server reads and writes the device memory itself.
    """

    kind = "cuda"

    def __init__(self, byte_size: int, device_id: int = 0, name: str = "") -> None:
        from trtserve.service.backends.tensorrt.cuda import check, runtime_module

        rt = runtime_module()
        self.name = name or f"trtserve-cuda-{uuid.uuid4().hex[:16]}"
        self.byte_size = byte_size
        self.device_id = device_id
        check(rt.cudaSetDevice(device_id), "cudaSetDevice")
        self.pointer = int(check(rt.cudaMalloc(byte_size), "cudaMalloc"))
        handle = check(rt.cudaIpcGetMemHandle(self.pointer), "cudaIpcGetMemHandle")
        # cuda-python 13 exposes the 64-byte struct only through its address.
        self.raw_handle = bytes((ctypes.c_char * 64).from_address(handle.getPtr()))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def slot(self, offset: int, byte_size: int) -> RegionSlot:
        if offset < 0 or offset + byte_size > self.byte_size:
            raise ValueError(f"{byte_size} bytes at offset {offset} do not fit in region "
                             f"'{self.name}' of {self.byte_size} bytes")
        return RegionSlot(self.name, offset, byte_size)

    def upload(self, array: np.ndarray, offset: int = 0) -> RegionSlot:
        from trtserve.service.backends.tensorrt.cuda import check, runtime_module

        rt = runtime_module()
        array = np.ascontiguousarray(array)
        slot = self.slot(offset, array.nbytes)
        check(rt.cudaMemcpy(self.pointer + offset, array.ctypes.data, array.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "cudaMemcpy H2D")
        return slot

    def download(self, dtype: Any, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        from trtserve.service.backends.tensorrt.cuda import check, runtime_module

        rt = runtime_module()
        out = np.empty(shape, dtype=dtype)
        self.slot(offset, out.nbytes)
        check(rt.cudaMemcpy(out.ctypes.data, self.pointer + offset, out.nbytes,
                            rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "cudaMemcpy D2H")
        return out

    def close(self) -> None:
        from trtserve.service.backends.tensorrt.cuda import check, runtime_module

        check(runtime_module().cudaFree(self.pointer), "cudaFree")


__all__ = ["CudaRegion", "RegionSlot", "RegionTensor", "SystemRegion"]
