"""`bench --shared-memory system|cuda`: requests whose tensors live in registered regions.

As perf_analyzer's `--shared-memory` does: each request variant gets its inputs
written once into a region and one output slot there; the requests sent carry
only references, so what is measured is the server without the tensors' trip
through gRPC. The regions are registered over the protocol being measured (v1 or
KServe's shared-memory extension) and unregistered when the run ends.

Requests of one variant in flight at once share its output slot; the bytes they
write are the same, and the bench never reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from trtserve.client.bench.channels import _metadata
from trtserve.client.bench.config import BenchConfig
from trtserve.client.shared_memory import CudaRegion, RegionSlot, SystemRegion

Region = SystemRegion | CudaRegion
MODES = ("none", "system", "cuda")


@dataclass(frozen=True)
class _Placed:
    """Where one variant's inputs and outputs are: name -> slot."""

    inputs: dict[str, RegionSlot]
    outputs: dict[str, RegionSlot]


def _layout(arrays: Mapping[str, np.ndarray], output_bytes: Mapping[str, int]
            ) -> tuple[int, dict[str, int], dict[str, int]]:
    """Byte offsets of every tensor in one region (64-byte aligned), and its size."""
    offset, inputs, outputs = 0, {}, {}
    for name, array in arrays.items():
        inputs[name] = offset
        offset += -(-array.nbytes // 64) * 64
    for name, nbytes in output_bytes.items():
        outputs[name] = offset
        offset += -(-max(nbytes, 1) // 64) * 64
    return max(offset, 64), inputs, outputs


@contextlib.contextmanager
def regions_for(config: BenchConfig, channel: grpc.Channel,
                variants: Sequence[Mapping[str, np.ndarray]],
                output_bytes: Mapping[str, int]) -> Iterator[list[_Placed]]:
    """One registered region per variant, its inputs written in; unregistered on exit."""
    made: list[Region] = []
    placed: list[_Placed] = []
    try:
        for arrays in variants:
            size, in_at, out_at = _layout(arrays, output_bytes)
            region: Region
            if config.shared_memory == "system":
                region = SystemRegion.create(size)
                made.append(region)
                for name, array in arrays.items():
                    region.array(array.dtype, array.shape, in_at[name])[...] = array
            else:
                region = CudaRegion(size)
                made.append(region)
                for name, array in arrays.items():
                    region.upload(array, in_at[name])
            _register(config, channel, region)
            placed.append(_Placed(
                {n: region.slot(at, arrays[n].nbytes) for n, at in in_at.items()},
                {n: region.slot(at, output_bytes[n]) for n, at in out_at.items()}))
        yield placed
    finally:
        for region in made:
            with contextlib.suppress(grpc.RpcError):
                _unregister(config, channel, region.name)
            region.close()


def _register(config: BenchConfig, channel: grpc.Channel, region: Region) -> None:
    md = _metadata(config)
    if config.protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
        from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

        stub = pb_grpc.InferenceServiceStub(channel)
        if isinstance(region, SystemRegion):
            stub.RegisterSystemRegion(pb.RegisterSystemRegionRequest(
                name=region.name, key=region.key, byte_size=region.byte_size),
                timeout=config.timeout_s, metadata=md)
        else:
            stub.RegisterCudaRegion(pb.RegisterCudaRegionRequest(
                name=region.name, raw_handle=region.raw_handle, device_id=region.device_id,
                byte_size=region.byte_size), timeout=config.timeout_s, metadata=md)
        return
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb
    from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc

    kstub = kpb_grpc.GRPCInferenceServiceStub(channel)
    if isinstance(region, SystemRegion):
        kstub.SystemSharedMemoryRegister(kpb.SystemSharedMemoryRegisterRequest(
            name=region.name, key=region.key, byte_size=region.byte_size),
            timeout=config.timeout_s, metadata=md)
    else:
        kstub.CudaSharedMemoryRegister(kpb.CudaSharedMemoryRegisterRequest(
            name=region.name, raw_handle=region.raw_handle, device_id=region.device_id,
            byte_size=region.byte_size), timeout=config.timeout_s, metadata=md)


def _unregister(config: BenchConfig, channel: grpc.Channel, name: str) -> None:
    md = _metadata(config)
    if config.protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
        from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

        pb_grpc.InferenceServiceStub(channel).UnregisterRegion(
            pb.UnregisterRegionRequest(name=name), timeout=config.timeout_s, metadata=md)
        return
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb
    from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc

    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    request_type = (kpb.SystemSharedMemoryUnregisterRequest
                    if config.shared_memory == "system" else kpb.CudaSharedMemoryUnregisterRequest)
    method = (stub.SystemSharedMemoryUnregister if config.shared_memory == "system"
              else stub.CudaSharedMemoryUnregister)
    method(request_type(name=name), timeout=config.timeout_s, metadata=md)


def encode_region_request(protocol: str, model: str, arrays: Mapping[str, np.ndarray],
                          dtypes: Mapping[str, str], placed: _Placed) -> bytes:
    """A serialized request naming `placed`'s slots instead of carrying bytes."""
    if protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

        v1 = pb.InferRequest(model=model)
        for name, array in arrays.items():
            v1.inputs.add(name=name, dtype=pb.DataType.Value(f"DATA_TYPE_{dtypes[name]}"),
                          shape=array.shape, region=placed.inputs[name].to_proto())
        for name, slot in placed.outputs.items():
            v1.output_regions[name].CopyFrom(slot.to_proto())
        return v1.SerializeToString()
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb

    ks = kpb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        tensor = ks.inputs.add(name=name, datatype=dtypes[name], shape=array.shape)
        _kserve_params(tensor.parameters, placed.inputs[name])
    for name, slot in placed.outputs.items():
        _kserve_params(ks.outputs.add(name=name).parameters, slot)
    return ks.SerializeToString()


def _kserve_params(params: object, slot: RegionSlot) -> None:
    p = params  # a protobuf map of InferParameter
    p["shared_memory_region"].string_param = slot.region  # type: ignore[index]
    p["shared_memory_offset"].int64_param = slot.offset  # type: ignore[index]
    p["shared_memory_byte_size"].int64_param = slot.byte_size  # type: ignore[index]


def output_sizes(protocol: str, answer: bytes) -> dict[str, int]:
    """Bytes of each output in a bytes-path answer: how large the output slots must be."""
    if protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

        return {t.name: len(t.data) for t in pb.InferResponse.FromString(answer).outputs}
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb

    response = kpb.ModelInferResponse.FromString(answer)
    return {t.name: len(raw) for t, raw in zip(response.outputs, response.raw_output_contents,
                                               strict=False)}


__all__ = ["MODES", "encode_region_request", "output_sizes", "regions_for"]
