"""Tensor data types and the wire form shared by every protocol.

A tensor on the wire is (dtype name, shape, raw little-endian bytes). BF16 has
no numpy dtype: it travels and computes here as uint16 bit patterns (the upper
half of the FP32 pattern), converted with `bf16_to_fp32` / `fp32_to_bf16`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trtserve.service import echo
from trtserve.service.errors import TensorError

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


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, wire dtype, shape with -1 for dynamic dims.

    shape includes the batch dimension (first) when the model batches.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    # Per dimension, the model's name for a dynamic one ("N"), None elsewhere; empty
    # where the backend names none. Dimensions of one name must agree in a request.
    dim_names: tuple[str | None, ...] = ()

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


def decode(name: str, dtype: str, shape: Sequence[int], data: bytes) -> np.ndarray:
    """Raw bytes -> read-only ndarray without copying; every mismatch is a TensorError."""
    np_dtype = DTYPES.get(dtype)
    if np_dtype is None:
        raise TensorError(name, f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if min(shape, default=0) < 0:
        raise TensorError(name, f"shape {echo.dims(shape)} has a negative dimension")
    count = math.prod(shape)
    expected = count * np_dtype.itemsize
    if len(data) != expected:
        raise TensorError(
            name,
            f"{len(data)} bytes of data, but shape {echo.dims(shape)} of {dtype} needs {expected}",
        )
    return shaped(name, np.frombuffer(data, dtype=np_dtype, count=count), shape)


def shaped(name: str, array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """array.reshape(shape), or a TensorError when numpy can't hold the shape at all.

    A zero-size shape with huge other dimensions ([0, 2**62]) passes every byte-count
    check, then numpy refuses it as too big: that is the client's error, not ours.
    """
    try:
        return array.reshape(tuple(shape))
    except ValueError:
        raise TensorError(name, f"shape {echo.dims(shape)} is too large") from None


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
