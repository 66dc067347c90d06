"""The serving core over real gRPC on loopback, ONNX Runtime on the CPU."""

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from trtserve.client import AsyncClient, Client, InferenceError
from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import running_server, server_config


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
    from trtserve.client.convert import infer_request, outputs_of
    from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

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
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
    from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc

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


# --- AsyncClient.stream(): many requests on one InferStream --------------------------


def test_each_request_on_the_stream_gets_its_own_answer(server, reference):
    rng = np.random.default_rng(3)
    # Several rows per request, so a misrouted slice would show.
    inputs = [rng.standard_normal((int(rng.integers(1, 4)), 64)).astype(np.float32)
              for _ in range(300)]

    async def run():
        async with AsyncClient(server.url) as c, c.stream() as s:
            return await asyncio.gather(*(s.infer("example", {"input": x}) for x in inputs))

    outs = asyncio.run(run())
    assert len(outs) == len(inputs)
    for x, out in zip(inputs, outs, strict=True):
        np.testing.assert_allclose(out["output"], reference(x), rtol=1e-5, atol=1e-5)


def test_a_bad_request_fails_alone_and_the_stream_carries_on(server, reference):
    good = np.ones((2, 64), np.float32)

    async def run():
        async with AsyncClient(server.url) as c, c.stream() as s:
            results = await asyncio.gather(
                s.infer("example", {"input": good}),
                s.infer("example", {"input": np.ones((1, 3), np.float32)}),
                s.infer("nope", {"input": good}),
                s.infer("example", {"input": good}),
                return_exceptions=True)
            after = await s.infer("example", {"input": good})
        return results, after

    (first, wrong_shape, unknown, last), after = asyncio.run(run())
    for out in (first, last, after):
        np.testing.assert_allclose(out["output"], reference(good), rtol=1e-5, atol=1e-5)
    assert isinstance(wrong_shape, InferenceError)
    assert wrong_shape.code == grpc.StatusCode.INVALID_ARGUMENT and "input" in wrong_shape.details
    assert isinstance(unknown, InferenceError) and unknown.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in unknown.details


def test_a_stream_the_server_refuses_fails_every_request_it_owes():
    x = {"input": np.ones((1, 64), np.float32)}

    async def run():
        empty = grpc.aio.server()  # no services: InferStream is UNIMPLEMENTED
        port = empty.add_insecure_port("127.0.0.1:0")
        await empty.start()
        try:
            async with AsyncClient(f"127.0.0.1:{port}") as c:
                async with c.stream() as s:
                    first = await asyncio.gather(s.infer("example", x), return_exceptions=True)
                    later = await asyncio.gather(s.infer("example", x), return_exceptions=True)
                async with c.stream() as s:
                    pair = await asyncio.gather(s.infer("example", x), s.infer("example", x),
                                                return_exceptions=True)
                return first + later, pair
        finally:
            await empty.stop(None)

    (first, later), pair = asyncio.run(run())
    assert isinstance(first, InferenceError) and first.code == grpc.StatusCode.UNIMPLEMENTED
    # A call on a stream that has ended fails at once, with the reason it ended.
    assert isinstance(later, InferenceError) and later.code == grpc.StatusCode.UNIMPLEMENTED
    # With two writes racing the refusal, gRPC's core may end the call INTERNAL
    # instead; either way each request owed fails, none hangs.
    assert [type(r) for r in pair] == [InferenceError, InferenceError]
    assert {r.code for r in pair} <= {grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL}


def test_a_timeout_gives_up_on_one_answer_only(server, reference):
    async def run():
        async with AsyncClient(server.url) as c, c.stream() as s:
            x = {"input": np.ones((1, 64), np.float32)}
            with pytest.raises(InferenceError) as gave_up:
                await s.infer("example", x, timeout=0)
            # The late answer to the abandoned request is dropped, not misrouted.
            zeros = np.zeros((1, 64), np.float32)
            out = await s.infer("example", {"input": zeros})
        return gave_up.value, out, zeros

    gave_up, out, zeros = asyncio.run(run())
    assert gave_up.code == grpc.StatusCode.DEADLINE_EXCEEDED
    np.testing.assert_allclose(out["output"], reference(zeros), rtol=1e-5, atol=1e-5)
