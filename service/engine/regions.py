"""Shared-memory regions that clients register, owned by the engine.

A co-located client puts a tensor's bytes in memory the server can map (a POSIX
shared-memory object, or device memory exported with a CUDA IPC handle) and
sends only a reference: region name, offset, byte size (`api.RegionRef`). The
registry lives in the engine, not in a frontend, so that every frontend process
of one engine sees the same regions (frontends forward register, unregister and
status through `engine.api.Engine`).

Ownership: the registry, its regions and their counters are touched only on the
engine's event loop. Worker threads see region memory only through the numpy
views a request carries into its batch; those views are buffer exports of the
region's mmap, so the mapping cannot be unmapped under them (Python's mmap
refuses to close while exports exist, and frees itself when the last view goes).

Unregistering a region that a request is using is refused (FAILED_PRECONDITION,
naming the region and how many requests use it): the client unregisters once its
requests are answered. A request still queued keeps the region until it is
answered or dropped; a request cancelled (client gone, deadline) while its batch
runs keeps it until that batch is done on the device, since the executor still
reads its inputs there and may write its outputs there by address: only then is a
system region unpinned and unmapped, a CUDA region's IPC handle closed.
Refusing, rather than waiting, keeps Unregister a quick call whose outcome does
not depend on how long a queue is.

System regions follow tritonclient's `shared_memory` utilities: the key names a
POSIX shared-memory object (`shm_open(key)`, on Linux `/dev/shm/<key>`, with or
without the leading slash), mapped once at register from `offset` for
`byte_size` bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import mmap
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np

from trtserve.client.dtypes import DTYPES, dtype_name
from trtserve.service import echo
from trtserve.service.backends.base import (
    DeviceTarget,
    DeviceTensor,
    HostTarget,
    ModelSpec,
    OutputTarget,
    PinnedRegionArray,
    RegionArray,
    device_tensor,
)
from trtserve.service.config import SharedMemoryConfig
from trtserve.service.engine.api import (
    CUDA,
    SYSTEM,
    RegionRef,
    RegionStatus,
    RegionUsage,
    TensorIn,
    TensorOut,
)
from trtserve.service.engine.cuda_ipc import (
    CUDA_IPC_HANDLE_BYTES,
    CudaIpc,
    CudaRuntimeIpc,
    HostPinner,
    PinOnce,
)
from trtserve.service.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TensorError,
)

log = logging.getLogger(__name__)

KINDS = (SYSTEM, CUDA)
# A request's reads from (or writes to) system regions up to this many bytes are done
# on the engine's loop; more go to a thread, so that the loop keeps serving (a pread
# of 64 MiB took 20 ms on the 2-core machine; one of 1 MiB, 0.25).
COPY_ON_LOOP_MAX_BYTES = 1 << 20
# Where Linux keeps POSIX shared-memory objects (what shm_open opens).
SHM_DIR = "/dev/shm"
# NAME_MAX: the longest file name, so the longest key.
MAX_KEY_CHARS = 255


# --- regions ----------------------------------------------------------------------------


class _Region(ABC):
    """A registered region: its bounds checks here, its memory in the subclass."""

    kind = ""

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.byte_size = byte_size
        self.in_use = 0

    def check(self, ref: RegionRef, what: str) -> None:
        """Refuse a reference outside the region (INVALID_ARGUMENT naming region and bound)."""
        if ref.offset < 0 or ref.byte_size < 0:
            raise InvalidArgument(f"{what}: shared-memory region '{echo.text(self.name)}': "
                                  f"offset {ref.offset} and byte size {ref.byte_size} must not "
                                  "be negative")
        if ref.offset + ref.byte_size > self.byte_size:
            raise InvalidArgument(
                f"{what}: shared-memory region '{echo.text(self.name)}' holds {self.byte_size} "
                f"bytes, but offset {ref.offset} + byte size {ref.byte_size} = "
                f"{ref.offset + ref.byte_size} reaches past its end")

    @abstractmethod
    def status(self) -> RegionStatus:
        """Implemented by each kind of region."""

    def before_use(self) -> None:  # noqa: B027 - a hook: only system regions need it
        """Check, once per request, that the region can still be read."""

    @abstractmethod
    def read(self, ref: RegionRef, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """Implemented by each kind of region."""

    @abstractmethod
    def write(self, ref: RegionRef, array: np.ndarray) -> None:
        """Implemented by each kind of region."""

    @abstractmethod
    def target(self, ref: RegionRef, device_io: bool) -> OutputTarget | None:
        """Where an executor may write an output going to `ref` (None: it can't; the
        output is copied in afterwards). `device_io`: the executor writes device memory."""

    def holds(self, ref: RegionRef, array: np.ndarray) -> bool:
        """Whether `array` already lies at `ref` (an executor wrote it there)."""
        return False

    @abstractmethod
    def close(self) -> None:
        """Implemented by each kind of region."""


class _SystemObject(_Region):
    """`byte_size` bytes from `offset` of a POSIX shared-memory object, opened once: what
    both ways of reaching it share (SystemRegion copies, MappedSystemRegion maps)."""

    kind = SYSTEM

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        super().__init__(name, byte_size)
        self.key = key
        self.offset = offset
        self._path = _shm_path(name, key)
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise InvalidArgument(
                f"shared-memory region '{echo.text(name)}': cannot open key "
                f"'{echo.text(key)}' ({SHM_DIR}): {e.strerror}; create it on this host first "
                "(e.g. tritonclient.utils.shared_memory.create_shared_memory_region)") from None
        try:
            self._check_file(os.fstat(fd))
            self._open(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open(self, fd: int) -> None:
        """What a subclass does with the object once it is checked (the mapping)."""

    def _check_file(self, info: os.stat_result) -> None:
        if not stat.S_ISREG(info.st_mode):
            raise InvalidArgument(f"shared-memory region '{echo.text(self.name)}': key "
                                  f"'{echo.text(self.key)}' is not a shared-memory object")
        if self.offset + self.byte_size > info.st_size:
            raise InvalidArgument(
                f"shared-memory region '{echo.text(self.name)}': key '{echo.text(self.key)}' "
                f"holds {info.st_size} bytes, but offset {self.offset} + byte size "
                f"{self.byte_size} = {self.offset + self.byte_size} reaches past its end")

    def before_use(self) -> None:
        # A client that shrank its object after registering gets INVALID_ARGUMENT here,
        # before any work; one that shrinks it later gets it from the short read.
        self._check_file(os.fstat(self._fd))

    def status(self) -> RegionStatus:
        return RegionStatus(self.name, SYSTEM, self.byte_size, key=self.key, offset=self.offset,
                            in_use=self.in_use)

    def close(self) -> None:
        os.close(self._fd)


class SystemRegion(_SystemObject):
    """A system region read and written through the object's file descriptor (pread
    and pwrite), never through a mapping (`system_regions = "copy"`, the default).

    Why not map it: the object is the client's, and a client can shrink it
    (ftruncate) at any time. A CPU touching a mapped page past the new end gets
    SIGBUS, which no Python code can catch: the engine process dies, and with it
    every model (an adversarial run did exactly that, with two frontends). A read
    past the end is only a short read, which fails that one request. The price is
    one copy each way, by the kernel: about 20 ms for 64 MiB where a memcpy from a
    mapping took 7 (2-core machine). `MappedSystemRegion` is the zero-copy choice
    for clients the operator trusts (`server.shared_memory.system_regions`).
    """

    def read(self, ref: RegionRef, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        array = np.empty(shape, dtype)
        self.read_into(ref, array)
        return array

    def read_into(self, ref: RegionRef, array: np.ndarray) -> None:
        """Fill `array` (C-contiguous, ref.byte_size bytes) from the object; may run on any
        thread. A short read (the client shrank its object) is INVALID_ARGUMENT."""
        buffer = array.reshape(-1).view(np.uint8).data
        start = self.offset + ref.offset
        done = 0
        while done < len(buffer):
            got = os.preadv(self._fd, [buffer[done:]], start + done)
            if got == 0:
                raise InvalidArgument(
                    f"shared-memory region '{echo.text(self.name)}': its object ended "
                    f"{done} bytes into the {len(buffer)} bytes at offset {ref.offset}: the "
                    "client shrank it while the request used it")
            done += got

    def write(self, ref: RegionRef, array: np.ndarray) -> None:
        """Write `array`'s bytes into the object; may run on any thread. (Past the end of a
        shrunk object this grows it again: the client's memory, not the server's.)"""
        buffer = np.ascontiguousarray(array).reshape(-1).view(np.uint8).data
        start = self.offset + ref.offset
        done = 0
        try:
            while done < len(buffer):
                done += os.pwritev(self._fd, [buffer[done:]], start + done)
        except OSError as e:  # ENOSPC: /dev/shm is full
            raise FailedPrecondition(
                f"shared-memory region '{echo.text(self.name)}': writing the output failed: "
                f"{e.strerror}") from None

    def target(self, ref: RegionRef, device_io: bool) -> OutputTarget | None:
        return None  # no executor writes the object itself: write() copies once

    def holds(self, ref: RegionRef, array: np.ndarray) -> bool:
        return False


class MappedSystemRegion(_SystemObject):
    """A system region mapped once at register, which executors read and write where
    it lies (`server.shared_memory.system_regions = "in_place"`): no copy, and for
    TensorRT the mapping is page-locked so that copies to and from the device are
    DMA. It trusts every client that registers one: a client that shrinks its object
    while a request reads or writes it kills the engine process (SIGBUS), which
    `before_use` cannot prevent, only make unlikely."""

    def _open(self, fd: int) -> None:
        # mmap offsets are page-aligned: map from the page holding `offset`.
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        self._base = self.offset - start
        self._map = mmap.mmap(fd, self._base + self.byte_size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        # Page-locked with cudaHostRegister (pin), undone before unmapping.
        self._pin = PinOnce(f"shared-memory region '{self.name}'", log)

    @property
    def pinned(self) -> bool:
        return self._pin.pinned

    def pin(self, pinner: HostPinner) -> None:
        """Page-lock the mapping (once), so that executors copy between it and the device
        directly."""
        self._pin.pin(pinner, self._whole)

    def _whole(self) -> tuple[int, int]:
        whole = np.frombuffer(self._map, dtype=np.uint8)
        # No export may outlive the call: close() must be able to unmap.
        return whole.ctypes.data, whole.nbytes

    def read(self, ref: RegionRef, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        count = ref.byte_size // dtype.itemsize if dtype.itemsize else 0
        array = np.frombuffer(self._map, dtype=dtype, count=count,
                              offset=self._base + ref.offset).reshape(shape)
        # The client's memory: the model must never write into it.
        array.flags.writeable = False
        # Marked as a region's, so that the executor counts what it did with it.
        return array.view(PinnedRegionArray if self.pinned else RegionArray)

    def write(self, ref: RegionRef, array: np.ndarray) -> None:
        dest = np.frombuffer(self._map, dtype=np.uint8, count=array.nbytes,
                             offset=self._base + ref.offset)
        dest[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    def target(self, ref: RegionRef, device_io: bool) -> OutputTarget:
        buffer = np.frombuffer(self._map, dtype=np.uint8, count=ref.byte_size,
                               offset=self._base + ref.offset)
        return HostTarget(buffer, pinned=self.pinned)

    def holds(self, ref: RegionRef, array: np.ndarray) -> bool:
        if isinstance(array, DeviceTensor) or array.nbytes == 0:
            return False
        start = np.frombuffer(self._map, dtype=np.uint8, count=0,
                              offset=self._base + ref.offset).ctypes.data
        return bool(array.ctypes.data == start and array.flags.c_contiguous)

    def close(self) -> None:
        self._pin.unpin()
        super().close()
        # A batch of a cancelled request may still hold a view: then the mapping is
        # freed when the last view is (mmap's own reference counting), never under it.
        with contextlib.suppress(BufferError):
            self._map.close()


class CudaRegion(_Region):
    """Device memory another process exported with cudaIpcGetMemHandle.

    The CPU backend reads inputs with one device-to-host copy and writes outputs
    with one host-to-device copy (counted as host copies). TensorRT executors that
    can bind device memory take `device_pointer` instead (the hook for zero copy).
    """

    kind = CUDA

    def __init__(self, name: str, raw_handle: bytes, device_id: int, byte_size: int,
                 ipc: CudaIpc) -> None:
        super().__init__(name, byte_size)
        if len(raw_handle) != CUDA_IPC_HANDLE_BYTES:
            raise InvalidArgument(f"CUDA shared-memory region '{echo.text(name)}': the raw "
                                  f"handle has {len(raw_handle)} bytes; a cudaIpcMemHandle_t "
                                  f"has {CUDA_IPC_HANDLE_BYTES}")
        if device_id < 0:
            raise InvalidArgument(f"CUDA shared-memory region '{echo.text(name)}': device id "
                                  f"{device_id} must not be negative")
        self.device_id = device_id
        self._ipc = ipc
        try:
            self.pointer = ipc.open(raw_handle, device_id)
        except Exception as e:  # CudaError or no CUDA at all: the client's handle can't open
            raise InvalidArgument(
                f"CUDA shared-memory region '{echo.text(name)}': cannot open the IPC handle "
                f"on device {device_id}: {_cuda_reason(e)}") from None

    def device_pointer(self, ref: RegionRef) -> int:
        return self.pointer + ref.offset

    def status(self) -> RegionStatus:
        return RegionStatus(self.name, CUDA, self.byte_size, device_id=self.device_id,
                            in_use=self.in_use)

    def read(self, ref: RegionRef, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        out = np.empty(shape, dtype=dtype)
        self._ipc.to_host(self.device_pointer(ref), out, self.device_id)
        out.flags.writeable = False
        return out

    def read_device(self, ref: RegionRef, dtype: np.dtype, shape: tuple[int, ...]
                    ) -> DeviceTensor:
        """The input where it lies, for an executor that reads device memory: no copy."""
        return device_tensor(self.device_pointer(ref), self.device_id, dtype, shape)

    def write(self, ref: RegionRef, array: np.ndarray) -> None:
        self._ipc.to_device(self.device_pointer(ref), np.ascontiguousarray(array),
                            self.device_id)

    def target(self, ref: RegionRef, device_io: bool) -> OutputTarget | None:
        if not device_io:
            return None
        return DeviceTarget(self.device_pointer(ref), ref.byte_size, self.device_id)

    def holds(self, ref: RegionRef, array: np.ndarray) -> bool:
        return isinstance(array, DeviceTensor) and array.pointer == self.device_pointer(ref)

    def close(self) -> None:
        self._ipc.close(self.pointer, self.device_id)


def _cuda_reason(error: Exception) -> str:
    from trtserve.service.backends.tensorrt.cuda import CudaError

    if isinstance(error, CudaError):
        return error.name
    return "CUDA is not available in the server"


def _shm_path(name: str, key: str) -> str:
    """/dev/shm/<key>, for a key shm_open would take: one path component, no tricks."""
    bare = key[1:] if key.startswith("/") else key
    if not bare or len(bare) > MAX_KEY_CHARS or "/" in bare or "\0" in bare \
            or bare in (".", ".."):
        raise InvalidArgument(
            f"shared-memory region '{echo.text(name)}': key '{echo.text(key)}' is not a "
            f"shared-memory key (one name of 1-{MAX_KEY_CHARS} characters, optionally after "
            "one leading '/', as shm_open takes)")
    return os.path.join(SHM_DIR, bare)


# --- the registry -----------------------------------------------------------------------


class RegionRegistry:
    """Every registered region of one engine, and what they spared the wire."""

    def __init__(self, config: SharedMemoryConfig | None = None,
                 cuda: CudaIpc | None = None, pinner: HostPinner | None = None) -> None:
        self._config = config or SharedMemoryConfig()
        self._cuda = cuda
        # Page-locks system regions a TensorRT model uses (None: CUDA's, made on first use).
        self._pinner = pinner
        self._regions: dict[str, _Region] = {}
        self._mapped_bytes = 0
        self._input_bytes = 0
        self._output_bytes = 0
        self._zero_copy_inputs = 0
        self._host_copies = 0

    # --- register, unregister, status ---------------------------------------------------

    def _admit(self, name: str, byte_size: int, kind: str) -> None:
        if not name:
            raise InvalidArgument(f"{kind} shared-memory region: the name is empty")
        if name in self._regions:
            raise AlreadyExists(f"shared-memory region '{echo.text(name)}' is already "
                                "registered; unregister it first")
        if byte_size <= 0:
            raise InvalidArgument(f"shared-memory region '{echo.text(name)}': byte size "
                                  f"{byte_size} must be more than 0")
        limit = self._config.max_regions
        if limit == 0:
            raise FailedPrecondition("shared memory is turned off on this server "
                                     "(server.shared_memory.max_regions = 0)")
        if len(self._regions) >= limit:
            raise ResourceExhausted(
                f"shared-memory region '{echo.text(name)}': {len(self._regions)} regions are "
                f"registered, the server's limit (server.shared_memory.max_regions = {limit})")
        if self._mapped_bytes + byte_size > self._config.max_mapped_bytes:
            raise ResourceExhausted(
                f"shared-memory region '{echo.text(name)}': {byte_size} more bytes would map "
                f"{self._mapped_bytes + byte_size}, past the server's limit "
                f"(server.shared_memory.max_mapped_bytes = {self._config.max_mapped_bytes})")

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._admit(name, byte_size, SYSTEM)
        if offset < 0:
            raise InvalidArgument(f"shared-memory region '{echo.text(name)}': offset {offset} "
                                  "must not be negative")
        kind = MappedSystemRegion if self._config.system_regions == "in_place" else SystemRegion
        self._add(kind(name, key, offset, byte_size))

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int,
                      byte_size: int) -> None:
        self._admit(name, byte_size, CUDA)
        self._add(CudaRegion(name, raw_handle, device_id, byte_size,
                             self._cuda or CudaRuntimeIpc()))

    def _add(self, region: _Region) -> None:
        self._regions[region.name] = region
        self._mapped_bytes += region.byte_size

    def unregister(self, name: str | None, kind: str | None = None) -> None:
        """Unregister one region, or every region of `kind` (None: of both) when `name`
        is None or empty. An unknown name is not an error (as in Triton): the region
        is not registered afterwards either way. A region in use is refused; with
        `name` empty nothing is unregistered unless every region is free."""
        if name:
            region = self._regions.get(name)
            if region is None or (kind is not None and region.kind != kind):
                return
            victims = [region]
        else:
            victims = [r for r in self._regions.values() if kind is None or r.kind == kind]
        busy = [r for r in victims if r.in_use]
        if busy:
            shown = ", ".join(f"'{echo.text(r.name)}' ({r.in_use})" for r in busy[:4])
            raise FailedPrecondition(
                f"shared-memory region(s) in use by requests not yet answered or by the "
                f"batch of a request cancelled while it ran: {shown}; unregister once they "
                "are answered and their batches done")
        for region in victims:
            del self._regions[region.name]
            self._mapped_bytes -= region.byte_size
            region.close()

    def status(self, name: str | None, kind: str | None = None) -> tuple[RegionStatus, ...]:
        if name:
            region = self._regions.get(name)
            if region is None or (kind is not None and region.kind != kind):
                what = f"{kind} shared-memory" if kind else "shared-memory"
                raise NotFound(f"no {what} region '{echo.text(name)}' is registered")
            return (region.status(),)
        return tuple(r.status() for r in self._regions.values()
                     if kind is None or r.kind == kind)

    def usage(self) -> RegionUsage:
        return RegionUsage(len(self._regions), self._mapped_bytes, self._input_bytes,
                           self._output_bytes, self._zero_copy_inputs, self._host_copies)

    def close(self) -> None:
        """Unmap every region (the engine is stopping; nothing runs any more)."""
        for region in self._regions.values():
            region.close()
        self._regions.clear()
        self._mapped_bytes = 0

    # --- requests -------------------------------------------------------------------------

    def _region(self, ref: RegionRef, what: str) -> _Region:
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidArgument(f"{what}: shared-memory region '{echo.text(ref.region)}' is "
                                  "not registered")
        region.check(ref, what)
        return region

    @contextmanager
    def lease(self, inputs: Mapping[str, TensorIn], output_regions: Mapping[str, RegionRef],
              device_io: bool = False, output_bytes: Mapping[str, int] | None = None
              ) -> Iterator[Lease]:
        """Resolve a request's references; its regions stay registered until the block ends.

        Inputs become arrays (views of system regions, no copy); every reference is
        checked first, so a bad one fails the request before anything is read.
        `device_io`: the model's executor reads and writes device memory (TensorRT):
        CUDA-region inputs stay where they are (DeviceTensor), CUDA-region outputs
        are written by the executor, and system regions are page-locked on first use.
        `output_bytes`: each output's size where known before running: a region too
        small for it fails the request here, before any work.
        """
        regions: list[_Region] = []
        arrays: dict[str, np.ndarray] = {}
        for tensor_name, tensor in inputs.items():
            if isinstance(tensor.data, np.ndarray):
                arrays[tensor_name] = tensor.data
                continue
            ref = tensor.data
            what = f"tensor '{echo.text(tensor_name)}'"
            region = self._region(ref, what)
            dtype = DTYPES[tensor.dtype]
            needed = math.prod(tensor.shape) * dtype.itemsize
            if ref.byte_size != needed:
                raise TensorError(tensor_name, f"shared-memory byte size {ref.byte_size} does "
                                  f"not match shape {echo.dims(tensor.shape)} of {tensor.dtype}, "
                                  f"which needs {needed} bytes")
            regions.append(region)
        outputs: dict[str, tuple[_Region, RegionRef]] = {}
        for tensor_name, ref in output_regions.items():
            what = f"output '{echo.text(tensor_name)}'"
            region = self._region(ref, what)
            fixed = (output_bytes or {}).get(tensor_name)
            if fixed is not None and fixed > ref.byte_size:
                raise InvalidArgument(
                    f"{what}: the output needs {fixed} bytes, more than the {ref.byte_size} "
                    f"bytes given in shared-memory region '{echo.text(ref.region)}' (offset "
                    f"{ref.offset}); refused before running")
            outputs[tensor_name] = (region, ref)
            regions.append(region)
        for region in set(regions):
            region.before_use()
            if device_io and isinstance(region, MappedSystemRegion):
                region.pin(self.host_pinner())
        lease = Lease(self, arrays, outputs, device_io)
        for tensor_name, tensor in inputs.items():
            if isinstance(tensor.data, RegionRef):
                region = self._regions[tensor.data.region]
                dtype = DTYPES[tensor.dtype]
                try:
                    if device_io and isinstance(region, CudaRegion):
                        arrays[tensor_name] = region.read_device(tensor.data, dtype,
                                                                 tensor.shape)
                    elif isinstance(region, SystemRegion):  # read by `Lease.read_inputs`
                        arrays[tensor_name] = np.empty(tensor.shape, dtype)
                        lease.reads.append((region, tensor.data, arrays[tensor_name]))
                    else:
                        arrays[tensor_name] = region.read(tensor.data, dtype, tensor.shape)
                except (ValueError, MemoryError):  # numpy cannot hold the shape ([0, 2**62])
                    raise TensorError(tensor_name, f"shape {echo.dims(tensor.shape)} is too "
                                      "large") from None
                lease.input_bytes += tensor.data.byte_size
                self._input_bytes += tensor.data.byte_size
                in_place = isinstance(region, MappedSystemRegion) or (
                    device_io and isinstance(region, CudaRegion))
                if in_place:
                    self._zero_copy_inputs += 1
                else:  # into the server's memory: through the descriptor, or to the host
                    lease.copied_bytes += tensor.data.byte_size
                    if isinstance(region, CudaRegion):
                        self._host_copies += 1
                        lease.host_copies += 1
        for region in regions:
            region.in_use += 1
        lease.regions = regions
        try:
            yield lease
        finally:
            lease.release()

    def host_pinner(self) -> HostPinner:
        if self._pinner is None:
            from trtserve.service.engine.cuda_ipc import CudaHostPinner

            self._pinner = CudaHostPinner()
        return self._pinner

    def _wrote(self, region: _Region, nbytes: int, copied: bool) -> None:
        self._output_bytes += nbytes
        if copied and region.kind != SYSTEM:
            self._host_copies += 1


class Lease:
    """A request's resolved inputs and the regions its outputs go to.

    Counts, for the model's Stats, the bytes it spared the wire and the tensors it
    copied through host memory (`input_bytes`, `output_bytes`, `host_copies`).

    Its regions stay in use (unregister refused) while any hold is out: the
    `lease()` block's own, and each `keep()` of a request cancelled while its batch
    still reads or writes them, until that batch is done.
    """

    def __init__(self, registry: RegionRegistry, arrays: dict[str, np.ndarray],
                 outputs: Mapping[str, tuple[_Region, RegionRef]], device_io: bool) -> None:
        self._registry = registry
        self.arrays = arrays
        self._outputs = outputs
        self._device_io = device_io
        self.input_bytes = 0
        self.output_bytes = 0
        self.host_copies = 0
        # Inputs still to be read from system regions into their arrays (read_inputs).
        self.reads: list[tuple[SystemRegion, RegionRef, np.ndarray]] = []
        # Bytes of region inputs copied into the server's memory (system regions read
        # through their descriptor, CUDA regions copied to the host): the server's
        # budget of request bytes holds them, as it does bytes that crossed the wire.
        self.copied_bytes = 0
        # Each use of a region, counted in its in_use while any hold is out.
        self.regions: list[_Region] = []
        self._holds = 1

    def keep(self) -> Callable[[], None]:
        """Hold the regions past the lease's block; the callable returned gives this hold
        back (once: later calls do nothing)."""
        self._holds += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self.release()

        return give_back

    def release(self) -> None:
        """Give one hold back; with the last, the regions are free to unregister."""
        self._holds -= 1
        if self._holds == 0:
            for region in self.regions:
                region.in_use -= 1

    async def read_inputs(self) -> None:
        """Read the inputs of system regions into their arrays."""
        reads, self.reads = self.reads, []
        await self._copy([functools.partial(region.read_into, ref, array)
                          for region, ref, array in reads],
                         sum(ref.byte_size for _, ref, _ in reads))

    async def _copy(self, copies: list[Callable[[], None]], nbytes: int) -> None:
        """Run the copies (of `nbytes` in all) on the loop when small, else on a thread,
        the regions held until it ends even if the request does not wait for it
        (cancelled): the objects' descriptors must stay open."""
        if nbytes < COPY_ON_LOOP_MAX_BYTES:
            for copy in copies:
                copy()
            return

        def copy_all() -> None:
            for copy in copies:
                copy()

        give_back = self.keep()
        task = asyncio.ensure_future(asyncio.to_thread(copy_all))
        task.add_done_callback(lambda _: give_back())
        await asyncio.shield(task)

    def targets(self) -> dict[str, OutputTarget]:
        """Where the executor may write each region output itself (see _Region.target)."""
        found = {name: region.target(ref, self._device_io)
                 for name, (region, ref) in self._outputs.items()}
        return {name: target for name, target in found.items() if target is not None}

    async def write_outputs(self, results: Mapping[str, np.ndarray]
                            ) -> dict[str, np.ndarray | TensorOut]:
        """Copy each output named with a region into it, unless the executor already wrote
        it there; the others stay arrays.

        A region output is answered as a TensorOut (dtype, shape, and a reference
        carrying the bytes written, which may be fewer than the client reserved).
        """
        answered: dict[str, np.ndarray | TensorOut] = dict(results)
        writes: list[tuple[_Region, RegionRef, np.ndarray]] = []
        for tensor_name, (region, ref) in self._outputs.items():
            array = results[tensor_name]
            if array.nbytes > ref.byte_size:
                raise TensorError(tensor_name, f"the output has {array.nbytes} bytes (shape "
                                  f"{echo.dims(array.shape)}), more than the "
                                  f"{ref.byte_size} bytes given in shared-memory region "
                                  f"'{echo.text(ref.region)}'")
            copied = not region.holds(ref, array)
            if copied:
                writes.append((region, ref, array))
                if region.kind != SYSTEM:
                    self.host_copies += 1
            self._registry._wrote(region, array.nbytes, copied)
            self.output_bytes += array.nbytes
            answered[tensor_name] = TensorOut(dtype_name(array.dtype), tuple(array.shape),
                                              RegionRef(ref.region, ref.offset, array.nbytes))
        through_fd = [(region, ref, array) for region, ref, array in writes
                      if isinstance(region, SystemRegion)]
        for region, ref, array in writes:  # a mapping's memcpy, a CUDA region's copy
            if not isinstance(region, SystemRegion):
                region.write(ref, array)
        await self._copy([functools.partial(region.write, ref, array)
                          for region, ref, array in through_fd],
                         sum(array.nbytes for _, _, array in through_fd))
        return answered


def expected_output_bytes(spec: ModelSpec, inputs: Mapping[str, TensorIn],
                          output_regions: Mapping[str, RegionRef]) -> dict[str, int]:
    """Bytes of each region output that the model's declared shape fixes before it runs.

    A batching model's output [-1, 3, 4] for a request of 5 rows has 5*3*4 elements;
    an output with another dynamic dimension is only known once computed (checked
    then, in `Lease.write_outputs`).
    """
    rows = next((t.shape[0] for t in inputs.values() if t.shape), None)
    sizes: dict[str, int] = {}
    for name in output_regions:
        declared = spec.output(name)
        if declared is None:
            continue
        shape = list(declared.shape)
        if spec.batching:
            if not shape or rows is None:
                continue
            shape[0] = rows
        if all(d >= 0 for d in shape):
            sizes[name] = math.prod(shape) * declared.np_dtype.itemsize
    return sizes


# Runs a request given its lease: `lease.arrays` (system-region inputs still to be read:
# `await lease.read_inputs()` once the request may hold `lease.copied_bytes` of server
# memory), `lease.targets()` for its outputs, and `lease.keep` (see Keep).
Run = Callable[["Lease"], Awaitable[Mapping[str, np.ndarray]]]


async def infer_with_regions(registry: RegionRegistry, inputs: Mapping[str, TensorIn],
                             output_regions: Mapping[str, RegionRef], run: Run,
                             device_io: bool = False,
                             output_bytes: Mapping[str, int] | None = None,
                             counted: Callable[[Lease], None] | None = None
                             ) -> dict[str, np.ndarray | TensorOut]:
    """Resolve the request's references, run it, and write its region outputs.

    The one place an engine runs a request that may name regions: the regions stay
    registered (unregister is refused) from the check until the outputs are written,
    and, for a request that ends while its batch still runs (cancelled on the
    device), until that batch is done: `run` gets the lease (see Run), and hands its
    `keep` to the model. `counted` gets the lease once it is done, for per-model
    counters.
    """
    with registry.lease(inputs, output_regions, device_io, output_bytes) as lease:
        try:
            results = await run(lease)
            if lease.reads:
                raise RuntimeError("the request ran without reading its region inputs")
            return await lease.write_outputs(results)
        finally:
            if counted is not None:
                counted(lease)


__all__ = ["CUDA", "KINDS", "SYSTEM", "CudaIpc", "CudaRuntimeIpc", "Lease",
           "MappedSystemRegion", "RegionRegistry",
           "RegionStatus", "RegionUsage", "expected_output_bytes", "infer_with_regions"]
