"""numpy <-> trtserve.v1 tensors, for the clients."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from service.gen.trtserve.v1 import inference_pb2 as pb
from service.tensors import DTYPES, dtype_name, encode

_ENUM = {name: pb.DataType.Value(f"DATA_TYPE_{name}") for name in DTYPES}
_NAME = {v: k for k, v in _ENUM.items()}


def infer_request(model: str, inputs: Mapping[str, np.ndarray], outputs: list[str] | None = None,
                  request_id: str = "", dtypes: Mapping[str, str] | None = None
                  ) -> pb.InferRequest:
    """`dtypes` names wire types numpy can't express (e.g. {"x": "BF16"} for uint16 data)."""
    request = pb.InferRequest(model=model, id=request_id, outputs=outputs or [])
    for name, array in inputs.items():
        array = np.asarray(array)
        dtype = (dtypes or {}).get(name) or dtype_name(array.dtype)
        request.inputs.add(name=name, dtype=_ENUM[dtype], shape=array.shape, data=encode(array))
    return request


def outputs_of(response: pb.InferResponse) -> dict[str, np.ndarray]:
    result = {}
    for tensor in response.outputs:
        dtype = DTYPES[_NAME[tensor.dtype]]
        result[tensor.name] = np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))
    return result


def dtype_label(enum_value: int) -> str:
    return _NAME.get(enum_value, "UNSPECIFIED")
