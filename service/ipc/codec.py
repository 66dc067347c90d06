"""Tensors to and from the link's `Tensor` messages: small ones inline, large ones in an arena.

`INLINE_MAX_BYTES` is where carrying bytes inside the frame stops paying: below
it, one copy into the frame beats allocating a range, copying into it and
releasing it later. benchmarks/link.py measured, per request round trip on the
2-core machine: 1 KiB inline 6 us vs arena 13 us; 4 KiB 14 vs 16; 16 KiB 52 vs
22; 64 KiB 146 vs 41; 1 MiB 5.8 ms vs 0.56 ms. The crossover lies between 4 and
16 KiB.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from service.ipc.shm import Arena
from trtserve.client.dtypes import DTYPES
from trtserve.service.engine.api import RegionRef
from trtserve.service.errors import InvalidArgument

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
    shape = tuple(message.shape)
    if dtype is None:
        raise InvalidArgument(f"tensor '{message.name}': unknown dtype {message.dtype!r}")
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
