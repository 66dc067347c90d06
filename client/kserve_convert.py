"""numpy <-> KServe v2 (Open Inference Protocol) tensors, for KServeClient."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from trtserve.client.dtypes import DTYPES, decode, dtype_name, encode
from trtserve.client.gen.inference import grpc_service_pb2 as kpb


def kserve_request(model: str, inputs: Mapping[str, np.ndarray],
                   outputs: Sequence[str] = (), request_id: str = "",
                   dtypes: Mapping[str, str] | None = None) -> kpb.ModelInferRequest:
    """A ModelInferRequest carrying every input as raw little-endian bytes.

    `dtypes` names wire types numpy can't express ({"x": "BF16"} for uint16 bit patterns).
    """
    request = kpb.ModelInferRequest(model_name=model, id=request_id)
    for name, array in inputs.items():
        array = np.asarray(array)
        datatype = (dtypes or {}).get(name) or dtype_name(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(encode(array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


# Typed contents field of each datatype (FP16/BF16 only ever travel raw).
_TYPED_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                "UINT16": "uint_contents", "UINT32": "uint_contents",
                "UINT64": "uint64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}


def kserve_outputs(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Outputs by name; raw_output_contents[i] belongs to outputs[i], typed contents after.

    BF16 outputs come back as uint16 bit patterns (trtserve.service.tensors.bf16_to_fp32 widens
    them).
    """
    result = {}
    raw = response.raw_output_contents
    for index, tensor in enumerate(response.outputs):
        shape = tuple(tensor.shape)
        if index < len(raw):
            result[tensor.name] = decode(tensor.name, tensor.datatype, shape, raw[index])
        else:
            values = getattr(tensor.contents, _TYPED_FIELD[tensor.datatype])
            result[tensor.name] = np.array(values, dtype=DTYPES[tensor.datatype]).reshape(shape)
    return result
