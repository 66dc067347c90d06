"""Made-up input data of a wire dtype, for the command-line client, the load
generator and `trtserve profile`: one function, so that they send alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trtserve.client.dtypes import DTYPES, fp32_to_bf16


def random_array(dtype: str, shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """Random data of a wire dtype: normal floats, small integers, random booleans.

    BF16 comes as uint16 bit patterns of normal floats (send it with
    `dtypes={name: "BF16"}`): integers as bit patterns would be denormals near 0.
    """
    if dtype == "BF16":
        return fp32_to_bf16(rng.standard_normal(shape).astype(np.float32))
    np_dtype = DTYPES[dtype]
    if np_dtype.kind == "f":
        return rng.standard_normal(shape).astype(np_dtype)
    if np_dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(np.bool_)
    return rng.integers(0, 100, shape).astype(np_dtype)
