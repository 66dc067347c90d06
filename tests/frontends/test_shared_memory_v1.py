"""trtserve.v1 shared-memory regions through our own client: register a numpy-backed
system region, infer from it and into it, and every bad reference refused with its
code while the server keeps serving. Real gRPC on loopback, real ONNX Runtime."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from trtserve.client import Client
from trtserve.client.errors import InferenceError
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.client.shared_memory import RegionSlot, RegionTensor, SystemRegion
from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import running_server, server_config

ROWS, FEATURES, OUT = 4, 64, 16
IN_BYTES, OUT_BYTES = ROWS * FEATURES * 4, ROWS * OUT * 4


@pytest.fixture(scope="module")
def server(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1,
                                       max_batch_size=32))
    with running_server(config) as s:
        yield s


@pytest.fixture
def client(server):
    with Client(server.url) as c:
        yield c
        c.unregister_region()


@pytest.fixture
def region():
    with SystemRegion.create(IN_BYTES + OUT_BYTES) as r:
        yield r


@pytest.fixture(scope="module")
def reference(example_onnx):
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, FEATURES)).astype(np.float32)


def test_infer_from_and_into_a_numpy_backed_region(client, region, reference):
    client.register_region(region)
    x = region.array(np.float32, (ROWS, FEATURES))
    x[:] = _x(0)
    out = client.infer("example", {"input": x},
                       output_regions={"output": region.slot(IN_BYTES, OUT_BYTES)})
    np.testing.assert_allclose(out["output"], reference(x), rtol=1e-5, atol=1e-5)
    # The answer is the region itself, not a copy that crossed gRPC.
    assert np.shares_memory(out["output"], region.array(np.uint8, (OUT_BYTES,), IN_BYTES))
    stats = client.stats().shared_memory
    assert (stats.regions, stats.mapped_bytes) == (1, IN_BYTES + OUT_BYTES)
    assert stats.input_bytes >= IN_BYTES and stats.output_bytes >= OUT_BYTES
    # The default ("copy"): the engine reads and writes the object through its
    # descriptor, so the executor saw no view of a region (none zero-copy, no batch
    # counted bound or copied); host copies count only host-device crossings.
    assert stats.zero_copy_inputs == 0
    [model] = client.stats().models
    shm = model.shared_memory
    assert shm.input_bytes >= IN_BYTES and shm.output_bytes >= OUT_BYTES
    assert (shm.copied_batches, shm.bound_batches, shm.host_copies) == (0, 0, 0)
    [status] = client.region_status(region.name)
    assert (status.kind, status.key, status.byte_size, status.in_use) == (
        "system", region.key, IN_BYTES + OUT_BYTES, 0)


def test_region_input_with_output_over_the_wire_and_outputs_filter(client, region, reference):
    client.register_region(region)
    x = region.array(np.float32, (ROWS, FEATURES))
    x[:] = _x(1)
    out = client.infer("example", {"input": RegionTensor(region.slot(0, IN_BYTES), "FP32",
                                                         (ROWS, FEATURES))})
    np.testing.assert_allclose(out["output"], reference(x), rtol=1e-5, atol=1e-5)
    assert not np.shares_memory(out["output"], region.array(np.uint8, (IN_BYTES + OUT_BYTES,)))


def _raw_infer(server, request: pb.InferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Infer(request, timeout=30)
    return e.value


def _request(slot: RegionSlot, shape=(ROWS, FEATURES)) -> pb.InferRequest:
    request = pb.InferRequest(model="example")
    request.inputs.add(name="input", dtype=pb.DATA_TYPE_FP32, shape=shape,
                       region=slot.to_proto())
    return request


def test_every_bad_reference_is_invalid_argument(server, client, region, reference):
    client.register_region(region)
    size = region.byte_size
    cases = [
        (_request(RegionSlot("nope", 0, IN_BYTES)), "region 'nope' is not registered"),
        (_request(RegionSlot(region.name, size - 8, IN_BYTES)),
         f"holds {size} bytes, but offset {size - 8} + byte size {IN_BYTES}"),
        (_request(RegionSlot(region.name, 0, 8)),
         "shared-memory byte size 8 does not match shape [4, 64] of FP32"),
    ]
    unknown_output = _request(RegionSlot(region.name, 0, IN_BYTES))
    unknown_output.output_regions["nope"].CopyFrom(pb.RegionRef(region=region.name,
                                                                byte_size=8))
    cases.append((unknown_output, "tensor 'nope': output_regions names an unknown output"))
    for request, words in cases:
        error = _raw_infer(server, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert words in error.details()
    x = _x(2)
    np.testing.assert_allclose(client.infer("example", {"input": x})["output"], reference(x),
                               rtol=1e-5, atol=1e-5)


def test_register_errors_have_their_codes(client, region):
    client.register_region(region)
    with pytest.raises(InferenceError) as e:
        client.register_region(region)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(InferenceError) as e:
        client.region_status("nope")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    bad_cuda = pb.RegisterCudaRegionRequest(name="gpu", raw_handle=b"\0" * 64, byte_size=64)
    with pytest.raises(InferenceError) as e:
        client._call(client._stub.RegisterCudaRegion, bad_cuda, 30)
    # No GPU here (or a handle of nothing): refused, never a crash.
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "CUDA shared-memory region 'gpu': cannot open the IPC handle" in str(e.value)
    bad_len = pb.RegisterCudaRegionRequest(name="gpu", raw_handle=b"\0" * 3, byte_size=64)
    with pytest.raises(InferenceError) as e:
        client._call(client._stub.RegisterCudaRegion, bad_len, 30)
    assert "the raw handle has 3 bytes" in str(e.value)
    assert [r.name for r in client.region_status()] == [region.name]


def test_async_client_infers_from_and_into_a_region(server, region, reference):
    import asyncio

    from trtserve.client import AsyncClient

    x = region.array(np.float32, (ROWS, FEATURES))
    x[:] = _x(3)

    async def main() -> dict[str, np.ndarray]:
        async with AsyncClient(server.url) as c:
            await c.register_region(region)
            try:
                return await c.infer("example", {"input": x},
                                     output_regions={"output": region.slot(IN_BYTES, OUT_BYTES)})
            finally:
                await c.unregister_region(region)

    out = asyncio.run(main())
    np.testing.assert_allclose(out["output"], reference(x), rtol=1e-5, atol=1e-5)
    assert np.shares_memory(out["output"], region.array(np.uint8, (OUT_BYTES,), IN_BYTES))
