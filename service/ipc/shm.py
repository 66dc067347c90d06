"""Shared-memory arenas: tensor bytes cross between a frontend and the engine once.

Each frontend has two arenas, both created by the engine process as anonymous
memory files (memfd) before it starts the frontend, which inherits their file
descriptors: no name in /dev/shm, so nothing is left behind when either process
dies, whatever the signal.

- The input arena is the frontend's to fill: it writes a large input tensor
  into a range it allocates, and the request names the range; the engine reads
  the range as a read-only numpy view, straight into the batch's gather. The
  frontend frees the range when the engine's one reply to that request arrives
  (also after a cancel: the engine may still be reading until it replies).
- The output arena is the engine's to fill: it writes a large output into a
  range it allocates, and the reply names it; the frontend copies it out and
  releases the range over the link.

Ranges are allocated in a ring (`Ring`): allocation order is about completion
order for a batching server, so freeing is O(1) and the arena needs no
compaction. When the ring has no room (a range held long by a slow request),
the sender falls back to carrying the bytes inline: the arena is a fast path,
never a limit.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from collections import deque
from collections.abc import Sequence

import numpy as np

from trtserve.service.backends.base import PinnedHostArray
from trtserve.service.engine.cuda_ipc import HostPinner, PinOnce

log = logging.getLogger(__name__)

# Ranges start on a cache line.
ALIGN_BYTES = 64


class Ring:
    """Variable-size ranges of [0, capacity) allocated in a ring, freed in any order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        # [offset, size, live] in allocation order; the head of the ring is the last.
        self._blocks: deque[list[int]] = deque()
        self._by_offset: dict[int, list[int]] = {}
        self.used_bytes = 0

    def alloc(self, size: int) -> int | None:
        """The offset of a new range of `size` bytes, or None when there is no room."""
        size = -(-max(size, 1) // ALIGN_BYTES) * ALIGN_BYTES
        if not self._blocks:
            offset = 0 if size <= self.capacity else None
        else:
            tail = self._blocks[0][0]
            last = self._blocks[-1]
            end = last[0] + last[1]
            if end > tail:  # not wrapped: room after the head, else from 0 up to the tail
                offset = end if end + size <= self.capacity else (0 if size <= tail else None)
            else:  # wrapped: room between the head and the tail
                offset = end if end + size <= tail else None
        if offset is None:
            return None
        block = [offset, size, 1]
        self._blocks.append(block)
        self._by_offset[offset] = block
        self.used_bytes += size
        return offset

    def free(self, offset: int) -> None:
        """Free the range at `offset`; ranges not (or no longer) allocated are ignored."""
        block = self._by_offset.pop(offset, None)
        if block is None:
            return
        block[2] = 0
        self.used_bytes -= block[1]
        blocks = self._blocks
        while blocks and not blocks[0][2]:
            blocks.popleft()


class Arena:
    """One shared-memory file mapped in this process, and (for its writer) its ring."""

    def __init__(self, fd: int, size_bytes: int) -> None:
        self.fd = fd
        self.size_bytes = size_bytes
        self._map = mmap.mmap(fd, size_bytes, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self.ring = Ring(size_bytes)
        # Page-locked in the engine process while a TensorRT model is served (pin).
        self._pin = PinOnce(f"arena {fd}", log)

    @property
    def pinned(self) -> bool:
        return self._pin.pinned

    def pin(self, pinner: HostPinner) -> None:
        """Page-lock the arena (once), so that a TensorRT executor copies a request's input
        from it to the device directly."""
        self._pin.pin(pinner, lambda: (self._bytes.ctypes.data, self.size_bytes))

    @classmethod
    def create(cls, name: str, size_bytes: int) -> Arena:
        """A new anonymous arena whose file descriptor a child process may inherit."""
        fd = os.memfd_create(f"trtserve-{name}", 0)
        os.ftruncate(fd, size_bytes)
        os.set_inheritable(fd, True)
        return cls(fd, size_bytes)

    def write(self, array: np.ndarray) -> int | None:
        """Copy `array`'s bytes into a new range; its offset, or None when full."""
        return self.write_stacked((array,))

    def write_stacked(self, arrays: Sequence[np.ndarray]) -> int | None:
        """Copy the arrays' bytes one after another into a new range (a group's rows,
        stacked); its offset, or None when full."""
        nbytes = sum(a.nbytes for a in arrays)
        offset = self.ring.alloc(nbytes)
        if offset is None:
            return None
        at = offset
        for array in arrays:
            end = at + array.nbytes
            self._bytes[at:end] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            at = end
        return offset

    def view(self, offset: int, byte_size: int, dtype: np.dtype,
             shape: tuple[int, ...]) -> np.ndarray:
        """A read-only array over a range the other side wrote (no copy).

        Raises ValueError when the range lies outside the arena or does not
        hold exactly `shape` of `dtype`.
        """
        if offset < 0 or byte_size < 0 or offset + byte_size > self.size_bytes:
            raise ValueError(f"range {offset}+{byte_size} outside the arena of "
                             f"{self.size_bytes} bytes")
        count = byte_size // dtype.itemsize if dtype.itemsize else 0
        array = np.frombuffer(self._map, dtype=dtype, count=count, offset=offset)
        array = array.reshape(shape)
        array.flags.writeable = False
        return array.view(PinnedHostArray) if self._pin.pinned else array

    def free(self, offset: int) -> None:
        self.ring.free(offset)

    def close(self) -> None:
        """Unmap and close; views still alive keep the memory mapped until they go."""
        self._pin.unpin()
        self._bytes = np.empty(0, np.uint8)
        # A view still alive keeps the mapping (BufferError): it goes with the last one.
        with contextlib.suppress(BufferError):
            self._map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
