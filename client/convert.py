"""numpy <-> trtserve.v1 tensors, for the clients."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from trtserve.client.dtypes import DTYPES, dtype_name, encode
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.shared_memory import CudaRegion, RegionSlot, RegionTensor, SystemRegion

_ENUM = {name: pb.DataType.Value(f"DATA_TYPE_{name}") for name in DTYPES}
_NAME = {v: k for k, v in _ENUM.items()}


Region = SystemRegion | CudaRegion


def infer_request(model: str, inputs: Mapping[str, np.ndarray | RegionTensor],
                  outputs: list[str] | None = None, request_id: str = "",
                  dtypes: Mapping[str, str] | None = None,
                  regions: Iterable[Region] = (),
                  output_regions: Mapping[str, RegionSlot] | None = None) -> pb.InferRequest:
    """`dtypes` names wire types numpy can't express (e.g. {"x": "BF16"} for uint16 data).

    An input that is a view of one of `regions` (system regions) travels as a
    reference to it, as does a RegionTensor; every other input as bytes.
    """
    request = pb.InferRequest(model=model, id=request_id, outputs=outputs or [])
    system = [r for r in regions if isinstance(r, SystemRegion)]
    for name, value in inputs.items():
        if isinstance(value, RegionTensor):
            request.inputs.add(name=name, dtype=_ENUM[value.dtype], shape=value.shape,
                               region=value.slot.to_proto())
            continue
        array = np.asarray(value)
        dtype = (dtypes or {}).get(name) or dtype_name(array.dtype)
        slot = next((s for s in (r.slot_of(array) for r in system) if s is not None), None)
        if slot is not None:
            request.inputs.add(name=name, dtype=_ENUM[dtype], shape=array.shape,
                               region=slot.to_proto())
        else:
            request.inputs.add(name=name, dtype=_ENUM[dtype], shape=array.shape,
                               data=encode(array))
    for name, slot in (output_regions or {}).items():
        request.output_regions[name].CopyFrom(slot.to_proto())
    return request


def outputs_of(response: pb.InferResponse, regions: Mapping[str, Region] | None = None
               ) -> dict[str, np.ndarray]:
    """Outputs by name: arrays over the response's bytes, or of the region written into
    (a view of a system region; a copy downloaded from a CUDA region)."""
    result = {}
    for tensor in response.outputs:
        dtype = DTYPES[_NAME[tensor.dtype]]
        shape = tuple(tensor.shape)
        if tensor.WhichOneof("content") == "region":
            region = (regions or {}).get(tensor.region.region)
            if region is None:
                raise KeyError(f"output '{tensor.name}' was written into region "
                               f"'{tensor.region.region}', which this client did not register")
            result[tensor.name] = (region.array(dtype, shape, tensor.region.offset)
                                   if isinstance(region, SystemRegion)
                                   else region.download(dtype, shape, tensor.region.offset))
            continue
        result[tensor.name] = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    return result


def dtype_label(enum_value: int) -> str:
    return _NAME.get(enum_value, "UNSPECIFIED")
