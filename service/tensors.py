"""Tensors as the server takes them: model tensor specs, and request bytes decoded
into arrays with every mismatch a TensorError naming the tensor (INVALID_ARGUMENT).

The wire's data types and encoding are the protocol's, shared with the client:
trtserve.client.dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trtserve.client.dtypes import DTYPES
from trtserve.service import echo
from trtserve.service.errors import TensorError


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
