"""The serving core over real gRPC on loopback, ONNX Runtime on the CPU."""

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from client import AsyncClient, Client, InferenceError
from service.config import ModelConfig
from tests.conftest import server_config
from tests.servers import running_server


@pytest.fixture(scope="module")
def server(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=2,
                                       max_batch_size=32, max_queue_delay_us=2000))
    with running_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def reference(example_onnx):
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def test_64_concurrent_clients_each_get_their_own_answer(server, reference):
    rng = np.random.default_rng(1)
    # Several rows per request, so a misrouted slice would show.
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32)
              for _ in range(64 * 8)]

    async def client_task(client, chunk):
        return [await client.infer("example", {"input": x}) for x in chunk]

    async def run():
        clients = [AsyncClient(server.url) for _ in range(64)]
        try:
            chunks = [inputs[i::64] for i in range(64)]
            results = await asyncio.gather(*(client_task(c, ch) for c, ch in
                                             zip(clients, chunks, strict=True)))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return chunks, results

    chunks, results = asyncio.run(run())
    checked = 0
    for chunk, outs in zip(chunks, results, strict=True):
        assert len(outs) == len(chunk)
        for x, out in zip(chunk, outs, strict=True):
            np.testing.assert_allclose(out["output"], reference(x), rtol=1e-5, atol=1e-5)
            checked += 1
    assert checked == len(inputs)

    with Client(server.url) as c:
        stats = c.stats("example").models[0]
    assert stats.mean_batch_size > 1
    assert all(w.batches > 0 for w in stats.workers), "every worker should have run work"
    assert stats.inferences >= sum(x.shape[0] for x in inputs)
    assert sum(stats.batch_size_histogram.values()) == stats.batches


def test_metadata_describes_the_model(server):
    with Client(server.url) as c:
        md = c.metadata("example")
    assert md.backend == "onnxruntime"
    assert [(t.name, list(t.shape)) for t in md.inputs] == [("input", [-1, 64])]
    assert [(t.name, list(t.shape)) for t in md.outputs] == [("output", [-1, 16])]
    assert md.max_batch_size == 32 and md.workers == 2


def test_stream_answers_carry_their_request_ids(server, reference):
    from client.convert import infer_request, outputs_of
    from service.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    rng = np.random.default_rng(2)
    xs = {f"r{i}": rng.standard_normal((2, 64)).astype(np.float32) for i in range(40)}
    requests = [infer_request("example", {"input": x}, request_id=i) for i, x in xs.items()]
    requests.insert(5, infer_request("example", {"input": np.zeros((1, 3), np.float32)},
                                     request_id="bad"))
    with grpc.insecure_channel(server.url) as channel:
        answers = list(pb_grpc.InferenceServiceStub(channel).InferStream(iter(requests)))
    by_id = {a.id: a for a in answers}
    assert len(answers) == len(requests) and set(by_id) == {*xs, "bad"}
    assert by_id["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "input" in by_id["bad"].error.message
    for i, x in xs.items():
        np.testing.assert_allclose(outputs_of(by_id[i].response)["output"], reference(x),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("inputs", "code", "words"), [
    ({"input": np.zeros((1, 63), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "dimension 1"),
    ({"input": np.zeros((1, 64), np.float64)}, grpc.StatusCode.INVALID_ARGUMENT, "FP64"),
    ({"input": np.zeros((64,), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "dimensions"),
    ({"input": np.zeros((33, 64), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "33 rows"),
    ({"input": np.zeros((0, 64), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "0 rows"),
    ({}, grpc.StatusCode.INVALID_ARGUMENT, "missing"),
    ({"input": np.zeros((1, 64), np.float32), "extra": np.zeros(1, np.float32)},
     grpc.StatusCode.INVALID_ARGUMENT, "unknown input"),
])
def test_bad_input_is_refused_naming_the_problem(server, inputs, code, words):
    with Client(server.url) as c, pytest.raises(InferenceError) as err:
        c.infer("example", inputs)
    assert err.value.code == code
    assert words in err.value.details


def test_unknown_model_is_not_found(server):
    with Client(server.url) as c, pytest.raises(InferenceError) as err:
        c.infer("missing", {"input": np.zeros((1, 64), np.float32)})
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "missing" in err.value.details


def test_unknown_output_is_refused(server):
    with Client(server.url) as c, pytest.raises(InferenceError) as err:
        c.infer("example", {"input": np.zeros((1, 64), np.float32)}, outputs=["nope"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in err.value.details


def test_byte_length_mismatch_is_refused(server):
    from service.gen.trtserve.v1 import inference_pb2 as pb
    from service.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

    request = pb.InferRequest(model="example")
    request.inputs.add(name="input", dtype=pb.DATA_TYPE_FP32, shape=[1, 64], data=b"\0" * 10)
    with grpc.insecure_channel(server.url) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.InferenceServiceStub(channel).Infer(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "10 bytes" in err.value.details()
    # The server still serves after the bad request.
    with Client(server.url) as c:
        assert c.infer("example", {"input": np.ones((1, 64), np.float32)})["output"].shape \
            == (1, 16)
