"""trtserve.v1 messages <-> numpy and the service's own records."""

from __future__ import annotations

import math
from collections.abc import Sequence

from trtserve.client.dtypes import DTYPES, dtype_name, encode
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service import echo
from trtserve.service.engine.api import (
    InferResult,
    ModelDescription,
    ModelSnapshot,
    ModelSpec,
    ModelState,
    Percentiles,
    RegionRef,
    RegionStatus,
    RegionUsage,
    TensorIn,
    WorkerSnapshot,
    wanted_outputs,
)
from trtserve.service.errors import TensorError
from trtserve.service.tensors import TensorSpec, decode

# Wire enum <-> dtype name. The enum's names are DATA_TYPE_<NAME>.
_ENUM_TO_NAME = {value: name.removeprefix("DATA_TYPE_")
                 for name, value in pb.DataType.items() if name != "DATA_TYPE_UNSPECIFIED"}
_NAME_TO_ENUM = {name: value for value, name in _ENUM_TO_NAME.items()}
assert set(_NAME_TO_ENUM) == set(DTYPES), "proto DataType and the wire's DTYPES disagree"


# Bytes per element of each wire enum value (weighing answers without serializing them).
_ITEMSIZE = {value: DTYPES[name].itemsize for value, name in _ENUM_TO_NAME.items()}


def dtype_enum(name: str) -> int:
    return _NAME_TO_ENUM[name]


def decode_inputs(request: pb.InferRequest) -> dict[str, TensorIn]:
    """Inputs as read-only arrays over the message's bytes (no copy), with their dtypes."""
    arrays: dict[str, TensorIn] = {}
    for tensor in request.inputs:
        name = tensor.name
        if not name:
            raise TensorError("", "an input has an empty name")
        if name in arrays:
            raise TensorError(name, "appears more than once in the request")
        dtype = _ENUM_TO_NAME.get(tensor.dtype)
        if dtype is None:
            raise TensorError(name, _dtype_problem(tensor.dtype))
        if tensor.WhichOneof("content") == "region":
            if min(tensor.shape, default=0) < 0:
                raise TensorError(name, f"shape {echo.dims(tensor.shape)} has a negative "
                                  "dimension")
            arrays[name] = TensorIn(dtype, tuple(tensor.shape), _region_ref(tensor.region))
            continue
        array = decode(name, dtype, tensor.shape, tensor.data)
        arrays[name] = TensorIn(dtype, array.shape, array)
    return arrays


def _region_ref(ref: pb.RegionRef) -> RegionRef:
    return RegionRef(ref.region, ref.offset, ref.byte_size)


def output_regions(request: pb.InferRequest) -> dict[str, RegionRef]:
    """Outputs the request wants written into regions (the engine checks the names)."""
    return {name: _region_ref(ref) for name, ref in request.output_regions.items()}


def _dtype_problem(value: int) -> str:
    expected = f"expected one of {sorted(_NAME_TO_ENUM)}"
    if value == pb.DATA_TYPE_UNSPECIFIED:
        # The enum field holds 32 bits: a larger value on the wire reads as its low
        # 32 bits (2**40 as 0), so 0 does not prove the client sent 0.
        return ("dtype is DATA_TYPE_UNSPECIFIED (0): not set, or a value outside the enum's "
                f"32-bit range; {expected}")
    return f"dtype enum value {value} is not a known DataType; {expected}"


def encode_outputs(request: pb.InferRequest, result: InferResult) -> pb.InferResponse:
    """The answer with the result's outputs, in its order (the engine keeps the request's)."""
    response = pb.InferResponse(model=request.model, id=request.id,
                                model_version=result.version)
    for name, tensor in result.outputs.items():
        array = tensor.data
        dtype = _NAME_TO_ENUM[tensor.dtype]
        if isinstance(array, RegionRef):  # written into a region: say where, not the bytes
            response.outputs.add(name=name, dtype=dtype, shape=tensor.shape,
                                 region=pb.RegionRef(region=array.region, offset=array.offset,
                                                     byte_size=array.byte_size))
            continue
        response.outputs.add(name=name, dtype=dtype, shape=array.shape, data=encode(array))
    return response


def shared_memory_stats(usage: RegionUsage) -> pb.SharedMemoryStats:
    return pb.SharedMemoryStats(
        regions=usage.regions, mapped_bytes=usage.mapped_bytes, input_bytes=usage.input_bytes,
        output_bytes=usage.output_bytes, zero_copy_inputs=usage.zero_copy_inputs,
        host_copies=usage.host_copies)


def region(status: RegionStatus) -> pb.Region:
    return pb.Region(name=status.name, kind=status.kind, byte_size=status.byte_size,
                     key=status.key, offset=status.offset, device_id=status.device_id,
                     in_use=status.in_use)


def check_outputs(request: pb.InferRequest, spec: ModelSpec) -> Sequence[TensorSpec]:
    """The outputs to answer with: those the request names, in its order, else every one.

    A TensorError, before execution, for a named output that does not exist or
    is named twice.
    """
    return wanted_outputs(request.model, spec, request.outputs)


def _percentiles(p: Percentiles) -> pb.Percentiles:
    return pb.Percentiles(count=p.count, mean_us=p.mean_us, p50_us=p.p50_us, p90_us=p.p90_us,
                          p99_us=p.p99_us)


def worker_stats(w: WorkerSnapshot) -> pb.WorkerStats:
    info = w.info
    return pb.WorkerStats(
        index=w.index, profile=info.profile, device=info.device, stream=info.stream,
        stream_non_blocking=info.stream_non_blocking, aux_streams=info.aux_streams,
        requests=w.requests, batches=w.batches, inferences=w.inferences,
        errors=w.errors, batch_size_histogram=w.batch_sizes,
        queue_time=_percentiles(w.queue_time), compute_time=_percentiles(w.compute_time),
        busy_seconds=w.busy_s, utilization=w.utilization, window_seconds=w.window_s,
        in_flight_batches=w.in_flight, graph_launches=w.graph_launches,
        plain_enqueues=w.plain_enqueues,
        capture_failures=[pb.CaptureFailure(batch_size=f.batch_size, reason=f.reason)
                          for f in w.capture_failures],
        rebuilds=w.rebuilds, healthy=w.healthy, last_error=w.last_error,
        min_batch_size=info.min_batch_size, max_batch_size=info.max_batch_size,
        inline_batches=w.inline_batches, rejected=w.rejected, state=w.state,
        retry_in_seconds=w.retry_in_s, retries=w.retries,
    )


def model_stats(model: ModelSnapshot, description: ModelDescription) -> pb.ModelStats:
    workers = [worker_stats(w) for w in model.workers]
    histogram: dict[int, int] = {}
    for w in model.workers:
        for size, count in w.batch_sizes.items():
            histogram[size] = histogram.get(size, 0) + count
    batches = sum(w.batches for w in workers)
    inferences = sum(w.inferences for w in workers)
    c = model.counters
    return pb.ModelStats(
        name=model.name, version=model.version, backend=description.spec.backend,
        queue_depth=model.queue_depth,
        requests=c.requests, batches=batches, inferences=inferences,
        errors=c.errors, rejected_queue_full=c.rejected_queue_full,
        deadline_exceeded=c.deadline_exceeded, cancelled=c.cancelled,
        batch_size_histogram=histogram,
        queue_time=_percentiles(model.queue_time),
        compute_time=_percentiles(model.compute_time),
        busy_seconds=sum(w.busy_seconds for w in workers),
        utilization=sum(w.utilization for w in workers) / max(len(workers), 1),
        window_seconds=max((w.window_seconds for w in workers), default=0.0),
        in_flight_batches=model.in_flight,
        graph_launches=sum(w.graph_launches for w in workers),
        plain_enqueues=sum(w.plain_enqueues for w in workers),
        workers=workers, mean_batch_size=inferences / batches if batches else 0.0,
        batching=description.spec.batching,
        shared_memory=pb.ModelSharedMemoryStats(
            input_bytes=c.shm_input_bytes, output_bytes=c.shm_output_bytes,
            copies_avoided=c.copies_avoided, host_copies=c.host_copies,
            bound_batches=c.io_paths.get("bound", 0),
            copied_batches=c.io_paths.get("copied", 0)),
        grouped_requests=c.grouped_requests, groups=c.groups,
    )


def _tensor_metadata(t: TensorSpec) -> pb.TensorMetadata:
    # Enum fields take their value's name, which keeps the typed stubs happy.
    return pb.TensorMetadata(name=t.name, dtype=f"DATA_TYPE_{t.dtype}", shape=t.shape)


def model_metadata(model: ModelDescription) -> pb.ModelMetadataResponse:
    spec = model.spec
    profiles = []
    for p in spec.profiles:
        workers = [i for i, w in enumerate(model.workers) if w.profile == p.index]
        ranges = [pb.ShapeRange(name=n, min=r[0], opt=r[1], max=r[2]) for n, r in p.ranges.items()]
        profiles.append(pb.Profile(index=p.index, inputs=ranges, workers=workers))
    return pb.ModelMetadataResponse(
        name=model.name, version=model.version, backend=spec.backend,
        inputs=[_tensor_metadata(t) for t in spec.inputs],
        outputs=[_tensor_metadata(t) for t in spec.outputs],
        min_batch_size=spec.min_batch_size if spec.batching else 0,
        max_batch_size=model.batching.max_batch_size if spec.batching else 0,
        profiles=profiles,
        preferred_batch_sizes=model.batching.preferred_batch_sizes if spec.batching else (),
        max_queue_delay_us=model.config.max_queue_delay_us, workers=len(model.workers),
        batching=spec.batching,
    )


__all__ = ["answer_bytes", "check_outputs", "decode_inputs", "dtype_enum", "dtype_name",
           "encode_outputs", "model_metadata", "model_stats", "worker_stats"]


def answer_bytes(response: pb.InferResponse) -> int:
    """About the bytes an answer holds (tensor data and id), from shapes and dtypes:
    reading `data` would copy it, and ByteSize would serialize the whole answer."""
    size = len(response.id)
    for tensor in response.outputs:
        if tensor.HasField("region"):
            continue  # written into the client's region: no bytes in the answer
        size += math.prod(tensor.shape) * _ITEMSIZE.get(tensor.dtype, 8)
    return size


def stream_answer_bytes(answer: pb.InferStreamResponse) -> int:
    """About the bytes an InferStream answer holds (tensor data, ids, error text)."""
    if answer.HasField("error"):
        return len(answer.id) + len(answer.error.message)
    return len(answer.id) + answer_bytes(answer.response)


def model_state(state: ModelState) -> pb.ModelState:
    return pb.ModelState(name=state.name, version=state.version, state=state.state,
                         path=state.path, reason=state.reason)
