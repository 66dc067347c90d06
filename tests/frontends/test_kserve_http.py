"""KServe v2 over HTTP/REST: tritonclient.http and plain HTTP against a live server.

Real HTTP over loopback to a real server (in a thread of this process) running
real ONNX Runtime sessions; answers are compared with ONNX Runtime's own.
"""

from __future__ import annotations

import gzip
import json
import ssl
import threading
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from trtserve.service.config import ModelConfig
from trtserve.service.testing.onnx_models import (
    LOOKUP_INPUT,
    LOOKUP_OUTPUT,
    lookup_net,
    lookup_table,
)
from trtserve.service.testing.servers import free_port, running_server, server_config

HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def lookup_onnx(tmp_path_factory: pytest.TempPathFactory):
    return lookup_net(tmp_path_factory.mktemp("lookup") / "lookup.onnx")


@pytest.fixture(scope="module")
def server(example_onnx, lookup_onnx):
    config = server_config(
        ModelConfig(name="example", path=str(example_onnx), workers=1, max_batch_size=16),
        ModelConfig(name="lookup", path=str(lookup_onnx), workers=1, max_batch_size=8),
        # Used by the statistics test alone, so its counts are exact.
        ModelConfig(name="counted", path=str(example_onnx), workers=1, max_batch_size=8),
        http_port=free_port(), max_receive_message_bytes=1024 * 1024)
    with running_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def url(server) -> str:
    return f"127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def client(url):
    c = httpclient.InferenceServerClient(url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference(example_onnx):
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)


def _input(x: np.ndarray, binary: bool = True, name: str = "input",
           datatype: str = "FP32") -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


class Answer:
    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        length = self.headers.get(HEADER)
        return json.loads(self.body[:int(length)] if length else self.body)


def http(url: str, path: str, body: bytes | dict | None = None, method: str | None = None,
         headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None,
         scheme: str = "http") -> Answer:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"{scheme}://{url}{path}", data=data, method=method,
                                     headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as r:
            return Answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.headers, e.read())


def infer_json(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.tolist()}], **extra}


# --- tritonclient.http ---------------------------------------------------------------


def test_tritonclient_sees_a_ready_server_and_its_models(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("example") and client.is_model_ready("example", "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready("example", "2")
    meta = client.get_server_metadata()
    assert meta["name"] == "trtserve"
    assert {"model_configuration", "statistics", "binary_tensor_data"} <= set(meta["extensions"])
    model = client.get_model_metadata("example")
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    config = client.get_model_config("example")
    # Numbers as numbers (protobuf's JSON writes int64 as strings), defaults included.
    assert config["max_batch_size"] == 16 and config["input"][0]["dims"] == [64]
    assert config["input"][0]["data_type"] == "TYPE_FP32"


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_tritonclient_infer_equals_onnx_runtime(client, reference, binary_in, binary_out):
    x = _x(3, seed=int(binary_in) * 2 + int(binary_out))
    output = httpclient.InferRequestedOutput("output", binary_data=binary_out)
    result = client.infer("example", [_input(x, binary_in)], outputs=[output],
                          request_id="r-1")
    np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5, atol=1e-5)
    answer = result.get_response()
    assert answer["id"] == "r-1" and answer["model_version"] == "1"
    assert ("parameters" in answer["outputs"][0]) == binary_out


def test_tritonclient_compressed_request_and_response(client, reference):
    x = _x(16, seed=7)  # 1 KiB of output: large enough to be compressed
    for algorithm in ("gzip", "deflate"):
        result = client.infer("example", [_input(x)], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5,
                                   atol=1e-5)


def test_tritonclient_statistics_count_requests(client):
    before = client.get_inference_statistics("counted")["model_stats"][0]
    client.infer("counted", [_input(_x(2))])
    client.infer("counted", [_input(_x(1))])
    stats = client.get_inference_statistics("counted")["model_stats"]
    assert [s["name"] for s in stats] == ["counted"]
    after = stats[0]
    assert after["inference_stats"]["success"]["count"] - \
        before["inference_stats"]["success"]["count"] == 2
    assert after["inference_count"] - before["inference_count"] == 3
    assert isinstance(after["inference_stats"]["queue"]["ns"], int)
    every = client.get_inference_statistics()["model_stats"]
    assert {s["name"] for s in every} == {"example", "lookup", "counted"}


def test_tritonclient_errors_carry_the_status_and_message(client):
    with pytest.raises(InferenceServerException) as err:
        client.infer("nope", [_input(_x(1))])
    assert err.value.status() == "404" and "nope" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("example", [_input(_x(1)[:, :10])])
    assert err.value.status() == "400" and "tensor 'input'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("example", "2")
    assert err.value.status() == "404" and "version '2'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_system_shared_memory_status("nope")
    assert err.value.status() == "404" and "'nope'" in err.value.message()


# --- plain HTTP ----------------------------------------------------------------------


def test_health_answers_200_and_model_ready_400_for_unknown(url):
    assert http(url, "/v2/health/live").status == 200
    assert http(url, "/v2/health/ready").status == 200
    assert http(url, "/v2/models/example/ready").status == 200
    assert http(url, "/v2/models/example/versions/1/ready").status == 200
    # KServe: 4xx means "not ready"; an unknown model is not ready rather than an error.
    assert http(url, "/v2/models/nope/ready").status == 400


def test_json_infer_with_nested_data_equals_onnx_runtime(url, reference):
    x = _x(2, seed=3)
    answer = http(url, "/v2/models/example/infer", infer_json(x, id="7"))
    assert answer.status == 200 and answer.headers["Content-Type"].startswith(
        "application/json")
    assert HEADER not in answer.headers
    body = answer.json()
    assert body["id"] == "7" and body["model_name"] == "example"
    (out,) = body["outputs"]
    assert out["name"] == "output" and out["datatype"] == "FP32" and out["shape"] == [2, 16]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 16), reference(x),
                               rtol=1e-5, atol=1e-5)


def test_binary_tensors_both_ways(url, reference):
    x = _x(3, seed=4)
    header = json.dumps({
        "inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True}}).encode()
    answer = http(url, "/v2/models/example/versions/1/infer", header + x.tobytes(),
                  headers={HEADER: str(len(header))})
    assert answer.status == 200, answer.body
    length = int(answer.headers[HEADER])
    (out,) = json.loads(answer.body[:length])["outputs"]
    assert out["parameters"]["binary_data_size"] == 3 * 16 * 4 == len(answer.body) - length
    got = np.frombuffer(answer.body[length:], np.float32).reshape(3, 16)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)


def test_int64_json_input(url):
    ids = [[0, 1, 2, 3], [9, 8, 7, -1]]
    answer = http(url, "/v2/models/lookup/infer", {
        "inputs": [{"name": LOOKUP_INPUT, "shape": [2, 4], "datatype": "INT64", "data": ids}]})
    assert answer.status == 200, answer.body
    (out,) = answer.json()["outputs"]
    assert out["name"] == LOOKUP_OUTPUT and out["shape"] == [2, 4, 8]
    np.testing.assert_array_equal(np.array(out["data"], np.float32).reshape(2, 4, 8),
                                  lookup_table()[np.array(ids)])


def test_answers_are_compressed_when_asked_and_worth_it(url):
    big, small = infer_json(_x(16)), infer_json(_x(1))
    for body, compressed in ((big, True), (small, False)):
        request = urllib.request.Request(f"http://{url}/v2/models/example/infer",
                                         data=json.dumps(body).encode(),
                                         headers={"Accept-Encoding": "gzip"})
        with urllib.request.urlopen(request, timeout=30) as r:
            raw = r.read()
            assert (r.headers.get("Content-Encoding") == "gzip") == compressed
        answer = json.loads(gzip.decompress(raw) if compressed else raw)
        assert answer["outputs"][0]["shape"][0] == len(body["inputs"][0]["data"])


def test_gzip_request_body(url, reference):
    x = _x(1, seed=5)
    answer = http(url, "/v2/models/example/infer", gzip.compress(json.dumps(infer_json(x))
                                                                 .encode()),
                  headers={"Content-Encoding": "gzip"})
    assert answer.status == 200, answer.body
    np.testing.assert_allclose(np.array(answer.json()["outputs"][0]["data"], np.float32),
                               reference(x).ravel(), rtol=1e-5, atol=1e-5)


def _error(answer: Answer, status: int, *fragments: str) -> None:
    assert answer.status == status, (answer.status, answer.body)
    assert answer.headers["Content-Type"].startswith("application/json")
    message = json.loads(answer.body)["error"]
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(("body", "status", "fragments"), [
    (b"{not json", 400, ("not valid JSON",)),
    (b"[1, 2]", 400, ("must be a JSON object",)),
    ({"inputs": "x"}, 400, ("'inputs' must be a list",)),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}, 400,
     ("tensor 'input'", "no 'data'")),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0]}]}, 400,
     ("tensor 'input'", "1 elements", "needs 64")),
    ({"inputs": [{"name": "input", "shape": [1, 2], "datatype": "FP32",
                  "data": [1.0, "a"]}]}, 400, ("tensor 'input'",)),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "STRING", "data": []}]}, 400,
     ("tensor 'input'", "unknown datatype")),
    ({"inputs": [{"name": "other", "shape": [1, 64], "datatype": "FP32",
                  "data": [0.0] * 64}]}, 400, ("tensor 'other'", "unknown input")),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                  "data": [0.0] * 64}], "parameters": {"sequence_id": 3}}, 400,
     ("sequence_id",)),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                  "data": [0.0] * 64}], "outputs": [{"name": "nope"}]}, 400,
     ("tensor 'nope'", "not an output")),
    ({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                  "data": [0.0] * 64}], "parameters": {"timeout": -1}}, 400, ("timeout",)),
])
def test_bad_requests_are_400_naming_the_problem(url, body, status, fragments):
    _error(http(url, "/v2/models/example/infer", body), status, *fragments)


def test_int_json_data_out_of_range_or_fractional_is_refused(url):
    for data in ([[0, 1, 2, 3.5]], [[0, 1, 2, 2**70]], [[True, False, True, False]]):
        _error(http(url, "/v2/models/lookup/infer", {"inputs": [
            {"name": LOOKUP_INPUT, "shape": [1, 4], "datatype": "INT64", "data": data}]}),
            400, f"tensor '{LOOKUP_INPUT}'")


def test_binary_sizes_must_add_up_to_the_body(url):
    header = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    _error(http(url, "/v2/models/example/infer", header + bytes(100),
                headers={HEADER: str(len(header))}), 400, "binary_data_size", "256")
    _error(http(url, "/v2/models/example/infer", header + bytes(256),
                headers={HEADER: "nonsense"}), 400, HEADER)
    _error(http(url, "/v2/models/example/infer", header + bytes(256),
                headers={HEADER: str(10**9)}), 400, HEADER)


def test_unknown_model_version_and_endpoint_are_404(url):
    _error(http(url, "/v2/models/nope/infer", infer_json(_x(1))), 404, "nope")
    _error(http(url, "/v2/models/example/versions/3/infer", infer_json(_x(1))), 404,
           "version '3'")
    _error(http(url, "/v2/models/nope"), 404, "nope")
    _error(http(url, "/v2/models/nope/config"), 404, "nope")
    _error(http(url, "/v2/models/nope/stats"), 404, "nope")
    _error(http(url, "/v2/nothing/here"), 404, "/v2/nothing/here")
    _error(http(url, "/v2/models/example/infer", method="GET"), 405, "GET")
    _error(http(url, "/v2/trace/setting"), 501, "tracing")


def test_a_body_over_the_limit_is_413_and_the_server_serves_on(url, reference):
    big = json.dumps(infer_json(_x(2000))).encode()
    assert len(big) > 1024 * 1024
    _error(http(url, "/v2/models/example/infer", big), 413, "larger than the server accepts")
    # Without a Content-Length (chunked), the limit holds while reading.
    chunks = iter([big[i:i + 65536] for i in range(0, len(big), 65536)])
    answer = http(url, "/v2/models/example/infer", chunks,  # type: ignore[arg-type]
                  headers={"Transfer-Encoding": "chunked"})
    _error(answer, 413)
    x = _x(1)
    np.testing.assert_allclose(
        np.array(http(url, "/v2/models/example/infer", infer_json(x)).json()["outputs"][0]
                 ["data"], np.float32), reference(x).ravel(), rtol=1e-5, atol=1e-5)


def test_an_answer_over_the_send_limit_is_429_as_in_grpc(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1),
                           http_port=free_port(), max_send_message_bytes=1024)
    with running_server(config) as s:
        url = f"127.0.0.1:{s.server.http_port}"
        # 16 rows of 16 FP32 outputs: 1 KiB of output and its JSON header, over 1 KiB.
        _error(http(url, "/v2/models/example/infer", infer_json(_x(16))), 429,
               "max_send_message_bytes")
        assert http(url, "/v2/models/example/infer", infer_json(_x(1))).status == 200


def test_concurrent_clients_each_get_their_own_answer(url, reference):
    answers: dict[int, np.ndarray] = {}

    def one(i: int) -> None:
        x = _x(1, seed=100 + i)
        body = http(url, "/v2/models/example/infer", infer_json(x, id=str(i))).json()
        assert body["id"] == str(i)
        answers[i] = np.array(body["outputs"][0]["data"], np.float32) - reference(x).ravel()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 16
    assert max(float(np.abs(d).max()) for d in answers.values()) < 1e-4


def test_json_past_its_own_limit_is_413_binary_tensors_are_not_held_to_it(example_onnx,
                                                                          reference):
    # json.loads holds the event loop for all of its input, and a few kilobytes of gzip
    # inflate to hundreds of MiB: the JSON part has a limit below the body's.
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1,
                                       max_batch_size=4096),
                           http_port=free_port(), max_receive_message_bytes=4 << 20,
                           http_max_json_bytes=64 * 1024)
    with running_server(config) as s:
        url = f"127.0.0.1:{s.server.http_port}"
        big = json.dumps(infer_json(_x(200))).encode()
        assert 64 * 1024 < len(big) < 4 << 20
        _error(http(url, "/v2/models/example/infer", big), 413, "http_max_json_bytes",
               "binary data")
        # 3 MiB of zeros in 3 KiB of gzip: refused while it inflates, before it is parsed.
        bomb = gzip.compress(b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32",'
                             b'"data":[' + b"0," * (3 << 19) + b"0]}]}")
        assert len(bomb) < 16 * 1024
        _error(http(url, "/v2/models/example/infer", bomb,
                    headers={"Content-Encoding": "gzip"}), 413, "http_max_json_bytes")
        # Binary tensors: only the JSON header counts against it.
        x = _x(2000)
        header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape),
                                         "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "outputs": [{"name": "output",
                                          "parameters": {"binary_data": True}}]}).encode()
        answer = http(url, "/v2/models/example/infer", header + x.tobytes(),
                      headers={HEADER: str(len(header))})
        assert answer.status == 200, answer.body
        length = int(answer.headers[HEADER])
        np.testing.assert_allclose(np.frombuffer(answer.body[length:], np.float32),
                                   reference(x).ravel(), rtol=1e-5, atol=1e-5)
        padded = header + b" " * (64 * 1024)
        _error(http(url, "/v2/models/example/infer", padded + x.tobytes(),
                    headers={HEADER: str(len(padded))}), 413, "http_max_json_bytes")
        _error(http(url, "/v2/models/example/infer",
                    b'{"inputs":[{"name":"input","shape":[1],"datatype":"INT64","data":['
                    + b"7" * 5000 + b"]}]}"), 400, "digits")
        x = _x(1)
        np.testing.assert_allclose(
            np.array(http(url, "/v2/models/example/infer", infer_json(x)).json()["outputs"][0]
                     ["data"], np.float32), reference(x).ravel(), rtol=1e-5, atol=1e-5)
