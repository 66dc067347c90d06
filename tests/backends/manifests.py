"""A build manifest read back as the ModelSpec it records, for the TensorRT tests.

TensorRT-RTX engines cannot be deserialized without a GPU, so on the CPU the tests
check what a build recorded (its manifest, `trtserve.service.build.build.build_engine`)
instead. Serving always reads the engine itself and never needs this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from trtserve.service.backends.base import ModelSpec
from trtserve.service.backends.tensorrt.api import IOTensor
from trtserve.service.backends.tensorrt.load import EngineLoadError, model_spec

# numpy dtype names as the build manifest writes them -> wire dtype names. The
# manifest records BF16 as uint16 (its numpy carrier), so it reads back as UINT16.
_WIRE_FROM_NUMPY = {
    "float32": "FP32",
    "float16": "FP16",
    "int8": "INT8",
    "uint8": "UINT8",
    "int32": "INT32",
    "int64": "INT64",
    "bool": "BOOL",
    "uint16": "UINT16",
}


def manifest_spec(manifest: Mapping[str, Any], model: str,
                  batching_mode: bool | str = "auto") -> ModelSpec:
    """The ModelSpec that a build manifest records."""
    io_tensors = [
        IOTensor(t["name"], t["mode"], np.dtype(t["dtype"]), tuple(t["shape"]))
        for t in manifest["io_tensors"]
    ]
    wire = {}
    for tensor in io_tensors:
        if tensor.dtype.name not in _WIRE_FROM_NUMPY:
            raise EngineLoadError(
                f"model '{model}': tensor '{tensor.name}' has dtype {tensor.dtype}, which the "
                "wire format cannot carry"
            )
        wire[tensor.name] = _WIRE_FROM_NUMPY[tensor.dtype.name]
    profiles = []
    for profile in sorted(manifest["profiles"], key=lambda p: p["index"]):
        profiles.append({
            name: (tuple(r["min"]), tuple(r["opt"]), tuple(r["max"]))
            for name, r in profile["inputs"].items()
        })
    return model_spec(io_tensors, wire, profiles, model, batching_mode)
