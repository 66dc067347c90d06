"""What to send: the model's inputs, the serialized requests, the probe; server Stats."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from trtserve.client.bench.channels import _metadata, _method, _sync_channel
from trtserve.client.bench.config import BenchConfig, TensorInfo
from trtserve.client.random_data import random_array


def concrete_shape(tensor: TensorInfo, rows: int, override: tuple[int, ...] | None
                   ) -> tuple[int, ...]:
    if override is not None:
        return override
    if not tensor.shape:
        return ()
    rest = tensor.shape[1:]
    if any(d < 0 for d in rest):
        raise ValueError(f"input '{tensor.name}' has dynamic dimensions {list(tensor.shape)}; "
                         f"give its shape with --shape {tensor.name}=D0,D1,...")
    first = rows if tensor.shape[0] < 0 else tensor.shape[0]
    return (first, *rest)


def make_inputs(inputs: Sequence[TensorInfo], config: BenchConfig, variant: int
                ) -> dict[str, np.ndarray]:
    files = dict(config.input_files)
    shapes = dict(config.shapes)
    rng = np.random.default_rng(config.seed + variant)
    arrays = {}
    for t in inputs:
        if t.name in files:
            arrays[t.name] = np.load(files[t.name])
        else:
            shape = concrete_shape(t, config.batch_rows, shapes.get(t.name))
            arrays[t.name] = random_array(t.dtype, shape, rng)
    unknown = set(files) - {t.name for t in inputs}
    if unknown:
        raise ValueError(f"--input names {sorted(unknown)}, which the model does not take "
                         f"(inputs: {[t.name for t in inputs]})")
    return arrays


def encode_request(protocol: str, model: str, arrays: dict[str, np.ndarray],
                   dtypes: dict[str, str]) -> bytes:
    from trtserve.client.dtypes import encode

    if protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

        v1 = pb.InferRequest(model=model)
        for name, a in arrays.items():
            v1.inputs.add(name=name, dtype=pb.DataType.Value(f"DATA_TYPE_{dtypes[name]}"),
                          shape=a.shape, data=encode(a))
        return v1.SerializeToString()
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb

    ks = kpb.ModelInferRequest(model_name=model)
    for name, a in arrays.items():
        ks.inputs.add(name=name, datatype=dtypes[name], shape=a.shape)
        ks.raw_input_contents.append(encode(a))
    return ks.SerializeToString()


def model_inputs(channel: grpc.Channel, config: BenchConfig) -> list[TensorInfo]:
    """The model's inputs from its metadata, over the protocol being measured."""
    md = _metadata(config)
    if config.protocol == "v1":
        from trtserve.client.convert import dtype_label
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
        from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

        v1 = pb_grpc.InferenceServiceStub(channel).ModelMetadata(
            pb.ModelMetadataRequest(model=config.model), timeout=config.timeout_s, metadata=md)
        return [TensorInfo(t.name, dtype_label(t.dtype), tuple(t.shape)) for t in v1.inputs]
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb
    from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc

    ks = kpb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
        kpb.ModelMetadataRequest(name=config.model), timeout=config.timeout_s, metadata=md)
    return [TensorInfo(t.name, t.datatype, tuple(t.shape)) for t in ks.inputs]


def _check_answer(protocol: str, answer: bytes) -> int:
    """Number of outputs in one answer; the probe fails loudly on an empty one."""
    if protocol == "v1":
        from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

        return len(pb.InferResponse.FromString(answer).outputs)
    from trtserve.client.gen.inference import grpc_service_pb2 as kpb

    return len(kpb.ModelInferResponse.FromString(answer).outputs)


def prepare(config: BenchConfig, stack: contextlib.ExitStack[Any] | None = None,
            variants: int = 8) -> list[bytes]:
    """Serialized requests to cycle through; one probe call checks they are accepted.

    With `config.shared_memory`, the tensors go into regions registered here and
    unregistered when `stack` closes (it must be given then).
    """
    with _sync_channel(config) as channel:
        inputs = model_inputs(channel, config)
        dtypes = {t.name: t.dtype for t in inputs}
        arrays = [make_inputs(inputs, config, i) for i in range(variants)]
        payloads = [encode_request(config.protocol, config.model, a, dtypes) for a in arrays]
        call = channel.unary_unary(_method(config.protocol), request_serializer=None,
                                   response_deserializer=None)
        answer = call(payloads[0], timeout=config.timeout_s, metadata=_metadata(config))
        if _check_answer(config.protocol, answer) == 0:
            raise ValueError(f"model '{config.model}' answered the probe with no outputs")
        if config.shared_memory == "none":
            return payloads
        if stack is None:
            raise ValueError("shared-memory regions need a stack to unregister them")
        from trtserve.client.bench.shared_memory import (
            encode_region_request,
            output_sizes,
            regions_for,
        )

        sizes = output_sizes(config.protocol, answer)
        # Its own channel: it must outlive this one, to unregister at the end.
        register_channel: grpc.Channel = _sync_channel(config)
        stack.callback(register_channel.close)
        placed = stack.enter_context(regions_for(config, register_channel, arrays, sizes))
        payloads = [encode_region_request(config.protocol, config.model, a, dtypes, p)
                    for a, p in zip(arrays, placed, strict=True)]
        answer = call(payloads[0], timeout=config.timeout_s, metadata=_metadata(config))
    return payloads


def server_batches(config: BenchConfig) -> tuple[int, int] | None:
    """(batches, rows) so far from trtserve's Stats; None where the server has no Stats."""
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
    from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    try:
        with _sync_channel(config) as channel:
            stats = pb_grpc.InferenceServiceStub(channel).Stats(
                pb.StatsRequest(model=config.model), timeout=5, metadata=_metadata(config))
    except grpc.RpcError:
        return None
    if not stats.models:
        return None
    return stats.models[0].batches, stats.models[0].inferences
