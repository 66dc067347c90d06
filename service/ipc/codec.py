"""Tensors to and from the link's `Tensor` messages: small ones inline, large ones in an arena.

`INLINE_MAX_BYTES` is where carrying bytes inside the frame stops paying: below
it, one copy into the frame beats allocating a range, copying into it and
releasing it later. The measurements (`python -m benchmarks.link`) are in
docs/processes.md, "Inline or arena".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from trtserve.client.dtypes import DTYPES
from trtserve.service.engine.api import RegionRef
from trtserve.service.errors import InvalidArgument
from trtserve.service.ipc.shm import Arena

INLINE_MAX_BYTES = 8 * 1024


def put(message: Any, name: str, dtype: str, shape: tuple[int, ...],
        data: np.ndarray | RegionRef, arena: Arena | None,
        inline_max_bytes: int = INLINE_MAX_BYTES) -> int | None:
    """Fill `message` (a link Tensor) with one tensor; the arena offset used, if any."""
    message.name = name
    message.dtype = dtype
    message.shape[:] = shape
    if isinstance(data, RegionRef):
        r = message.region
        r.region, r.offset, r.byte_size = data.region, data.offset, data.byte_size
        return None
    if arena is not None and data.nbytes > inline_max_bytes:
        offset = arena.write(data)
        if offset is not None:
            message.arena.offset = offset
            message.arena.byte_size = data.nbytes
            return offset
    message.inline = data.tobytes() if data.flags.c_contiguous else np.ascontiguousarray(
        data).tobytes()
    return None


def take(message: Any, arena: Arena | None, copy: bool) -> tuple[str, tuple[int, ...],
                                                                 np.ndarray | RegionRef]:
    """(dtype, shape, data) of a link Tensor. Arena ranges are views unless `copy`."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise InvalidArgument(f"tensor '{message.name}': unknown dtype {message.dtype!r}")
    # Through a list: protobuf's repeated field turns into a list in half the time it
    # takes to turn into a tuple (on every request's path, in the engine's loop).
    shape = tuple(message.shape[:])
    which = message.WhichOneof("data")
    if which == "region":
        r = message.region
        return message.dtype, shape, RegionRef(r.region, r.offset, r.byte_size)
    if which == "arena":
        if arena is None:
            raise InvalidArgument(f"tensor '{message.name}': no arena on this link")
        view = arena.view(message.arena.offset, message.arena.byte_size, dtype, shape)
        return message.dtype, shape, view.copy() if copy else view
    array = np.frombuffer(message.inline, dtype=dtype).reshape(shape)
    return message.dtype, shape, array
