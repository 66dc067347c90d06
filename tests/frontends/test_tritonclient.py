"""tritonclient[grpc] drives a live trtserve over real gRPC on loopback.

Everything goes through tritonclient's public API, exactly as a Triton user
would call it: readiness, metadata, the model configuration, unary and
streaming inference, statistics. Our generated types live in trtserve's own
descriptor pool (service/descriptors.py), so tritonclient imports here too.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from trtserve.service.config import ModelConfig
from trtserve.service.example_model import write_example
from trtserve.service.testing.servers import running_server, server_config

WIDE = 8192  # features per row of the "wide" model: 256 rows are 8 MiB each way


@pytest.fixture(scope="module")
def wide_onnx(tmp_path_factory: pytest.TempPathFactory):
    return write_example(tmp_path_factory.mktemp("wide") / "wide.onnx", in_features=WIDE,
                         hidden=16, out_features=WIDE)


@pytest.fixture(scope="module")
def server(example_onnx, wide_onnx):
    config = server_config(
        ModelConfig(name="example", path=str(example_onnx), workers=2, max_batch_size=32,
                    max_queue_delay_us=2000, preferred_batch_sizes=(8, 16)),
        # Used by the statistics test alone, so its counts are exact.
        ModelConfig(name="counted", path=str(example_onnx), workers=1, max_batch_size=8,
                    max_queue_delay_us=0),
        ModelConfig(name="wide", path=str(wide_onnx), workers=1, max_batch_size=256,
                    max_queue_delay_us=0),
    )
    with running_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.url)
    yield c
    c.close()


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def reference(example_onnx):
    session = _session(example_onnx)
    return lambda x: session.run(None, {"input": x})[0]


def _input(x: np.ndarray, name: str = "input") -> triton.InferInput:
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def test_server_and_model_readiness(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("example")
    assert client.is_model_ready("example", "1")
    # As Triton answers: unknown models and versions are not ready (no error).
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready("example", "2")


def test_server_metadata_lists_the_extensions_we_support(client):
    md = client.get_server_metadata(as_json=True)
    assert md["name"] == "trtserve"
    assert md["version"]
    assert {"statistics", "model_configuration", "system_shared_memory",
            "cuda_shared_memory"} <= set(md["extensions"])
    assert "sequence" not in md["extensions"]


def test_model_metadata(client):
    md = client.get_model_metadata("example", as_json=True)
    assert md["name"] == "example"
    assert md["versions"] == ["1"]
    assert md["platform"] == "onnxruntime_onnx"
    assert md["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert md["outputs"] == [{"name": "output", "datatype": "FP32", "shape": ["-1", "16"]}]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("no-such-model")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in e.value.message()


def test_model_config_describes_the_model_as_served(client):
    config = client.get_model_config("example").config
    assert config.name == "example"
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", triton.model_config_pb2.TYPE_FP32, [64])]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("output", triton.model_config_pb2.TYPE_FP32, [16])]
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 4096
    assert len(config.instance_group) == 1
    group = config.instance_group[0]
    assert group.kind == triton.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert group.count == 2
    assert list(group.gpus) == [] and list(group.profile) == []
    with pytest.raises(InferenceServerException) as e:
        client.get_model_config("example", "3")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert "'3'" in e.value.message()


def test_infer_matches_onnxruntime(client, reference):
    rng = np.random.default_rng(0)
    for rows in (1, 3, 32):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        result = client.infer("example", [_input(x)],
                              outputs=[triton.InferRequestedOutput("output")],
                              request_id=f"rows-{rows}")
        np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5,
                                   atol=1e-5)
        response = result.get_response()
        assert response.id == f"rows-{rows}"
        assert (response.model_name, response.model_version) == ("example", "1")
    # No requested outputs: all of them come back.
    x = rng.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(client.infer("example", [_input(x)]).as_numpy("output"),
                               reference(x), rtol=1e-5, atol=1e-5)


def test_infer_errors_carry_the_right_status(client):
    x = np.zeros((2, 63), np.float32)
    with pytest.raises(InferenceServerException) as e:
        client.infer("example", [_input(x)])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'input'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("example", [_input(np.zeros((1, 64), np.float32))],
                     outputs=[triton.InferRequestedOutput("nope")])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'nope'" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("missing", [_input(np.zeros((1, 64), np.float32))])
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_statistics_count_what_was_sent(client):
    before_ms = time.time() * 1000
    rng = np.random.default_rng(1)
    requests, rows = 12, 3
    for i in range(requests):
        client.infer("counted", [_input(rng.standard_normal((rows, 64)).astype(np.float32))],
                     request_id=str(i))
    stats = client.get_inference_statistics("counted").model_stats
    assert len(stats) == 1
    s = stats[0]
    assert (s.name, s.version) == ("counted", "1")
    assert s.inference_count == requests * rows
    assert 1 <= s.execution_count <= requests
    assert before_ms - 1000 <= s.last_inference <= time.time() * 1000 + 1000
    inf = s.inference_stats
    assert inf.success.count == requests and inf.success.ns > 0
    assert inf.fail.count == 0
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(inf, name).count == requests, name
    for name in ("queue", "compute_input", "compute_infer"):
        assert getattr(inf, name).ns > 0, name
    # Server time of a request covers its queue and compute time.
    assert inf.success.ns >= inf.queue.ns + inf.compute_infer.ns
    assert sum(b.compute_infer.count for b in s.batch_stats) == s.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in s.batch_stats) == \
        s.inference_count
    assert all(b.compute_infer.ns > 0 for b in s.batch_stats)

    # A failed request counts as a failure (and nothing else).
    with pytest.raises(InferenceServerException):
        client.infer("counted", [_input(np.zeros((1, 63), np.float32))])
    after = client.get_inference_statistics("counted").model_stats[0]
    assert after.inference_stats.success.count == requests

    every = client.get_inference_statistics().model_stats
    assert {m.name for m in every} == {"example", "counted", "wide"}
    with pytest.raises(InferenceServerException) as e:
        client.get_inference_statistics("counted", "7")
    assert e.value.status() == "StatusCode.NOT_FOUND"


def test_stream_results_match_by_request_id_and_errors_stay_in_the_stream(client, reference):
    rng = np.random.default_rng(2)
    xs = {f"r{i}": rng.standard_normal((1 + i % 3, 64)).astype(np.float32)
          for i in range(24)}
    results: dict[str, np.ndarray] = {}
    errors: list[InferenceServerException] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def callback(result, error):
        with lock:
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result.as_numpy("output")
        done.release()

    client.start_stream(callback=callback)
    try:
        ids = list(xs)
        for request_id in ids[:12]:
            client.async_stream_infer("example", [_input(xs[request_id])],
                                      request_id=request_id,
                                      outputs=[triton.InferRequestedOutput("output")])
        # A bad request in the middle: its error arrives on the stream...
        client.async_stream_infer("example", [_input(np.zeros((1, 63), np.float32))],
                                  request_id="bad")
        # ...and the stream keeps answering later requests.
        for request_id in ids[12:]:
            client.async_stream_infer("example", [_input(xs[request_id])],
                                      request_id=request_id)
        for _ in range(len(xs) + 1):
            assert done.acquire(timeout=30), "a stream response never arrived"
    finally:
        client.stop_stream()
    assert len(errors) == 1
    assert "'input'" in errors[0].message()
    assert set(results) == set(xs)
    for request_id, x in xs.items():
        np.testing.assert_allclose(results[request_id], reference(x), rtol=1e-5, atol=1e-5)


def test_large_messages_need_a_client_configured_for_them(server, wide_onnx):
    x = np.random.default_rng(3).standard_normal((256, WIDE)).astype(np.float32)
    assert x.nbytes == 8 * 1024 * 1024
    expected = _session(wide_onnx).run(None, {"input": x})[0]
    assert expected.nbytes == 8 * 1024 * 1024
    limit = 64 * 1024 * 1024
    configured = triton.InferenceServerClient(server.url, channel_args=[
        ("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)])
    try:
        result = configured.infer("wide", [_input(x)])
        np.testing.assert_allclose(result.as_numpy("output"), expected, rtol=1e-4, atol=1e-4)
    finally:
        configured.close()
    # With gRPC's own defaults (channel_args that leave the limits out) the 8 MiB
    # response is more than the client will receive.
    plain = triton.InferenceServerClient(server.url, channel_args=[])
    try:
        with pytest.raises(InferenceServerException) as e:
            plain.infer("wide", [_input(x)])
        assert e.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    finally:
        plain.close()
