"""Tensor data types and the wire form shared by every protocol (client and server).

A tensor on the wire is (dtype name, shape, raw little-endian bytes). BF16 has
no numpy dtype: it travels and computes here as uint16 bit patterns (the upper
half of the FP32 pattern), converted with `bf16_to_fp32` / `fp32_to_bf16`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Wire name -> numpy dtype (little-endian). BF16 is carried as uint16.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "UINT16": np.dtype("<u2"),
    "INT32": np.dtype("<i4"),
    "UINT32": np.dtype("<u4"),
    "INT64": np.dtype("<i8"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}

_NAME_OF = {dt: name for name, dt in DTYPES.items() if name != "BF16"}


def dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype (uint16 reads as UINT16, never BF16)."""
    try:
        return _NAME_OF[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}") from None


def decode(name: str, dtype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """A tensor a server sent -> read-only ndarray without copying.

    ValueError naming the tensor when the bytes do not fit the dtype and shape (the
    server validates what clients send with its own, stricter decoding).
    """
    np_dtype = DTYPES.get(dtype)
    if np_dtype is None:
        raise ValueError(f"tensor '{name}': unsupported dtype {dtype!r}")
    count = math.prod(shape)
    if min(shape, default=0) < 0 or len(data) != count * np_dtype.itemsize:
        raise ValueError(f"tensor '{name}': {len(data)} bytes do not hold shape "
                         f"{list(shape)} of {dtype}")
    return np.frombuffer(data, dtype=np_dtype, count=count).reshape(tuple(shape))


def encode(array: np.ndarray) -> bytes:
    """ndarray -> raw little-endian bytes (one copy, none if already contiguous LE)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array).tobytes()


def bf16_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even, as hardware does."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((u >> 16) & 1) + 0x7FFF
    return ((u + rounding) >> 16).astype(np.uint16)
