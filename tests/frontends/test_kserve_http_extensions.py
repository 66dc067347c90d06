"""KServe v2 over HTTP/REST: the model repository and system shared-memory extensions.

tritonclient.http and `tritonclient.utils.shared_memory` drive them as a Triton user
does; plain urllib requests check the error answers. Real HTTP over loopback, real
ONNX Runtime, real POSIX shared memory. (CUDA regions: tests/gpu/test_cuda_regions_http.py.)
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.frontends.test_kserve_http import Answer, http
from tests.frontends.test_shared_memory_kserve import _non_loopback_address
from trtserve.service.config import ModelConfig, SharedMemoryConfig
from trtserve.service.testing.onnx_models import offset_net
from trtserve.service.testing.servers import free_port, running_server, server_config

ROWS, FEATURES, OUT = 4, 64, 16
IN_BYTES, OUT_BYTES = ROWS * FEATURES * 4, ROWS * OUT * 4
TOKEN = "http-Token_0123"


@pytest.fixture(scope="module")
def server(example_onnx):
    config = server_config(
        ModelConfig(name="example", path=str(example_onnx), workers=1, max_batch_size=32),
        # Holds a lone request in the queue for a minute: a region stays in use.
        ModelConfig(name="slow", path=str(example_onnx), workers=1, max_batch_size=32,
                    max_queue_delay_us=60_000_000, preferred_batch_sizes=(32,)),
        http_port=free_port(),
        shared_memory=SharedMemoryConfig(max_regions=4, max_mapped_bytes=1 << 20))
    with running_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def url(server) -> str:
    return f"127.0.0.1:{server.server.http_port}"


@pytest.fixture
def client(url):
    c = httpclient.InferenceServerClient(url)
    c.unregister_system_shared_memory()
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def regions():
    """Creates regions with unique keys; destroys them after the test."""
    made = []

    def make(byte_size: int) -> tuple[str, str, Any]:
        tag = uuid.uuid4().hex[:12]
        name, key = f"region-{tag}", f"/trtserve-http-{tag}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        made.append(handle)
        return name, key, handle

    yield make
    for handle in made:
        shm.destroy_shared_memory_region(handle)


@pytest.fixture(scope="module")
def reference(example_onnx):
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def _x(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, FEATURES)).astype(np.float32)


def _shm_input(name: str, byte_size: int = IN_BYTES, offset: int = 0) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", [ROWS, FEATURES], "FP32")
    tensor.set_shared_memory(name, byte_size, offset)
    return tensor


def _shm_output(name: str, byte_size: int = OUT_BYTES, offset: int = 0
                ) -> httpclient.InferRequestedOutput:
    output = httpclient.InferRequestedOutput("output")
    output.set_shared_memory(name, byte_size, offset)
    return output


def _error(answer: Answer, status: int, *fragments: str) -> str:
    assert answer.status == status, (answer.status, answer.body)
    message: str = json.loads(answer.body)["error"]
    for fragment in fragments:
        assert fragment in message, message
    return message


def _shm_json(region: str, byte_size: int = IN_BYTES, offset: int | None = None,
              **params: Any) -> dict[str, Any]:
    parameters: dict[str, Any] = {"shared_memory_region": region,
                                  "shared_memory_byte_size": byte_size, **params}
    if offset is not None:
        parameters["shared_memory_offset"] = offset
    return {"inputs": [{"name": "input", "shape": [ROWS, FEATURES], "datatype": "FP32",
                        "parameters": parameters}]}


# --- system shared memory -------------------------------------------------------------


def test_tritonclient_http_infers_through_system_regions(client, regions, reference):
    in_name, in_key, in_handle = regions(IN_BYTES)
    out_name, out_key, out_handle = regions(OUT_BYTES)
    x = _x()
    shm.set_shared_memory_region(in_handle, [x])
    client.register_system_shared_memory(in_name, in_key, IN_BYTES)
    client.register_system_shared_memory(out_name, out_key, OUT_BYTES)

    result = client.infer("example", [_shm_input(in_name)], outputs=[_shm_output(out_name)])

    [output] = result.get_response()["outputs"]
    # Described, with no data: the bytes are in the client's region.
    assert (output["name"], output["datatype"], output["shape"]) == ("output", "FP32",
                                                                       [ROWS, OUT])
    # No parameters either (perf_analyzer reads binary_data_size from any that are sent).
    assert "data" not in output and "parameters" not in output
    got = shm.get_contents_as_numpy(out_handle, np.float32, [ROWS, OUT])
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)

    status = client.get_system_shared_memory_status()
    assert {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status} == {
        in_name: (in_key, 0, IN_BYTES), out_name: (out_key, 0, OUT_BYTES)}
    assert [r["name"] for r in client.get_system_shared_memory_status(in_name)] == [in_name]
    client.unregister_system_shared_memory(in_name)
    assert [r["name"] for r in client.get_system_shared_memory_status()] == [out_name]
    client.unregister_system_shared_memory()
    assert client.get_system_shared_memory_status() == []


def test_a_json_request_reads_a_region_at_an_offset_and_answers_json_data(
        url, client, regions, reference):
    name, key, handle = regions(2 * IN_BYTES)
    x = _x(1)
    shm.set_shared_memory_region(handle, [x], offset=IN_BYTES)
    client.register_system_shared_memory(name, key, 2 * IN_BYTES)
    answer = http(url, "/v2/models/example/infer", _shm_json(name, offset=IN_BYTES))
    assert answer.status == 200, answer.body
    data = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(ROWS, OUT)
    np.testing.assert_allclose(data, reference(x), rtol=1e-5, atol=1e-5)


def test_a_region_input_with_a_binary_output(
        client, regions, reference):
    # A region input, a binary (wire) output: tritonclient's default binary path.
    name, key, handle = regions(IN_BYTES)
    x = _x(2)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory(name, key, IN_BYTES)
    result = client.infer("example", [_shm_input(name)],
                          outputs=[httpclient.InferRequestedOutput("output")])
    np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5, atol=1e-5)


def test_every_bad_reference_is_400_naming_it_and_the_server_serves_on(
        url, client, regions, reference):
    name, key, handle = regions(IN_BYTES)
    client.register_system_shared_memory(name, key, IN_BYTES)
    x = _x(3)
    shm.set_shared_memory_region(handle, [x])
    infer = "/v2/models/example/infer"

    _error(http(url, infer, _shm_json("nope")), 400,
           "shared-memory region 'nope' is not registered")
    _error(http(url, infer, _shm_json(name, offset=16)), 400,
           f"region '{name}' holds {IN_BYTES} bytes, but offset 16 + byte size {IN_BYTES}")
    _error(http(url, infer, _shm_json(name, byte_size=512)), 400,
           "shared-memory byte size 512 does not match shape [4, 64] of FP32")
    _error(http(url, infer, _shm_json(name, byte_size=-1)), 400, "tensor 'input'",
           "must not be negative")
    _error(http(url, infer, _shm_json(name, byte_size="many")), 400,  # type: ignore[arg-type]
           "tensor 'input'", "shared_memory_byte_size")
    _error(http(url, infer, _shm_json(name, byte_size=[1])), 400,  # type: ignore[arg-type]
           "tensor 'input'", "shared_memory_byte_size")
    no_region = _shm_json(name)
    del no_region["inputs"][0]["parameters"]["shared_memory_region"]
    _error(http(url, infer, no_region), 400, "without shared_memory_region")
    both = _shm_json(name)
    both["inputs"][0]["data"] = x.ravel().tolist()
    _error(http(url, infer, both), 400, "tensor 'input'", "send one")
    gone = {**_shm_json(name), "outputs": [{"name": "output", "parameters": {
        "shared_memory_region": "gone", "shared_memory_byte_size": OUT_BYTES}}]}
    _error(http(url, infer, gone), 400, "output 'output'", "'gone' is not registered")
    # An output region too small for the output.
    small, small_key, _ = regions(16)
    client.register_system_shared_memory(small, small_key, 16)
    tiny = {**_shm_json(name), "outputs": [{"name": "output", "parameters": {
        "shared_memory_region": small, "shared_memory_byte_size": 16}}]}
    _error(http(url, infer, tiny), 400, "more than the 16 bytes given in shared-memory region")

    answer = http(url, infer, _shm_json(name))
    data = np.array(answer.json()["outputs"][0]["data"], np.float32).reshape(ROWS, OUT)
    np.testing.assert_allclose(data, reference(x), rtol=1e-5, atol=1e-5)


def test_register_and_status_errors_are_answered_as_over_grpc(url, client, regions):
    name, key, _ = regions(IN_BYTES)
    base = f"/v2/systemsharedmemory/region/{name}"
    _error(http(url, f"{base}/register", {"key": key}), 400, "'byte_size' is required")
    _error(http(url, f"{base}/register", {"key": 7, "byte_size": 16}), 400, "'key'")
    _error(http(url, f"{base}/register", {"key": key, "byte_size": 16, "offset": -1}), 400,
           "'offset'")
    _error(http(url, f"{base}/register", b"{oops"), 400, "not valid JSON")
    _error(http(url, f"{base}/register", {"key": "/trtserve-no-such-key", "byte_size": 16}),
           400, "trtserve-no-such-key")
    _error(http(url, f"{base}/register", {"key": key, "byte_size": IN_BYTES + 1}), 400)
    assert http(url, f"{base}/register", {"key": key, "byte_size": IN_BYTES}).status == 200
    _error(http(url, f"{base}/register", {"key": key, "byte_size": IN_BYTES}), 409, name)
    _error(http(url, "/v2/systemsharedmemory/region/nope/status"), 404, "nope")
    # Unregistering an unknown region is no error (as gRPC, and Triton).
    assert http(url, "/v2/systemsharedmemory/region/nope/unregister", b"").status == 200
    # The status answers GET (tritonclient) and POST.
    listed = http(url, f"{base}/status", b"").json()
    assert listed == [{"name": name, "key": key, "offset": 0, "byte_size": IN_BYTES}]
    _error(http(url, f"{base}/register", method="GET"), 405)


def test_control_bodies_are_bounded_before_they_are_parsed(url):
    big = json.dumps({"key": "k" * 70_000, "byte_size": 16}).encode()
    path = "/v2/systemsharedmemory/region/big/register"
    _error(http(url, path, big), 413, "larger than this endpoint accepts (65536 bytes)")
    # Without a Content-Length (chunked), the limit holds while reading.
    chunks = iter([big[i:i + 8192] for i in range(0, len(big), 8192)])
    _error(http(url, path, chunks, headers={"Transfer-Encoding": "chunked"}),  # type: ignore[arg-type]
           413)
    _error(http(url, "/v2/repository/index", big), 413)
    assert http(url, "/v2/systemsharedmemory/status").json() == []


def _wait_until_in_use(server, name: str, count: int = 1) -> None:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        statuses = server.call(_status(server, name))
        if statuses and statuses[0].in_use == count:
            return
        time.sleep(0.01)
    raise AssertionError(f"region {name} never had {count} request(s) using it")


async def _status(server, name):
    return server.server.engine.regions.status(name)


def test_unregister_while_in_use_is_refused_until_the_request_is_answered(
        server, url, client, regions):
    name, key, handle = regions(IN_BYTES)
    shm.set_shared_memory_region(handle, [_x(5)])
    client.register_system_shared_memory(name, key, IN_BYTES)
    answered: list[object] = []
    # "slow" holds the lone request in its queue; the client then hangs up after 2 s,
    # which cancels the request (as a gRPC deadline does).
    request = urllib.request.Request(f"http://{url}/v2/models/slow/infer",
                                     data=json.dumps(_shm_json(name)).encode())

    def call_and_hang_up() -> None:
        try:
            answered.append(urllib.request.urlopen(request, timeout=2).status)
        except TimeoutError as e:
            answered.append(e)

    call = threading.Thread(target=call_and_hang_up)
    call.start()
    try:
        _wait_until_in_use(server, name)
        _error(http(url, f"/v2/systemsharedmemory/region/{name}/unregister", b""), 400,
               f"'{name}' (1)")
        _error(http(url, "/v2/systemsharedmemory/unregister", b""), 400, name)
        assert [r["name"] for r in client.get_system_shared_memory_status()] == [name]
    finally:
        call.join(30)
    assert isinstance(answered[0], TimeoutError), answered
    _wait_until_in_use(server, name, count=0)
    client.unregister_system_shared_memory(name)
    assert client.get_system_shared_memory_status() == []


def test_a_request_timeout_answers_504_at_once_and_frees_its_region(server, url, client,
                                                                     regions):
    # "slow" would hold the lone request for a minute; its `timeout` (0.3 s) ends it
    # then: 504, and the region is free for unregister right after the answer.
    name, key, handle = regions(IN_BYTES)
    shm.set_shared_memory_region(handle, [_x(6)])
    client.register_system_shared_memory(name, key, IN_BYTES)
    body = {**_shm_json(name), "parameters": {"timeout": 300_000}}
    started = time.monotonic()
    answer = http(url, "/v2/models/slow/infer", body)
    took = time.monotonic() - started
    _error(answer, 504, "timeout")
    assert took < 20, f"answered after {took:.1f} s: not at its timeout"  # the hold: 60 s
    assert server.call(_status(server, name))[0].in_use == 0
    client.unregister_system_shared_memory(name)
    assert client.get_system_shared_memory_status() == []


def test_register_is_refused_from_another_host_unless_configured(example_onnx, regions):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    name, key, _ = regions(IN_BYTES)
    model = ModelConfig(name="example", path=str(example_onnx), workers=1)
    body = {"key": key, "byte_size": IN_BYTES}
    for allow in (False, True):
        config = server_config(model, host="0.0.0.0", http_port=free_port(),
                               shared_memory=SharedMemoryConfig(allow_remote_register=allow))
        with running_server(config) as s:
            remote = f"{address}:{s.server.http_port}"
            path = f"/v2/systemsharedmemory/region/{name}/register"
            if allow:
                assert http(remote, path, body).status == 200
                continue
            _error(http(remote, path, body), 403, "only from callers on this host")
            _error(http(remote, "/v2/cudasharedmemory/region/c/register",
                        {"raw_handle": {"b64": ""}, "device_id": 0, "byte_size": 1}), 403)
            # The same call over loopback is taken.
            assert http(f"127.0.0.1:{s.server.http_port}", path, body).status == 200


def test_the_extensions_need_the_token_when_auth_is_on(example_onnx, versions, regions,
                                                         tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    name, key, _ = regions(IN_BYTES)
    config = server_config(ModelConfig(name="m", path=str(versions[1]), workers=1),
                           http_port=free_port(), auth_token_file=str(token_file))
    with running_server(config) as s:
        url = f"127.0.0.1:{s.server.http_port}"
        calls = [(f"/v2/systemsharedmemory/region/{name}/register",
                  {"key": key, "byte_size": IN_BYTES}),
                 ("/v2/systemsharedmemory/status", None),
                 ("/v2/systemsharedmemory/unregister", b""),
                 ("/v2/cudasharedmemory/status", None),
                 ("/v2/repository/index", b""),
                 ("/v2/repository/models/m/unload", b"")]
        for path, body in calls:
            _error(http(url, path, body), 401)
        for path, body in calls:
            answer = http(url, path, body, headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status == 200, (path, answer.body)


def test_cuda_routes_answer_errors_without_a_gpu_call(url):
    _error(http(url, "/v2/cudasharedmemory/region/c/register", {"device_id": 0,
                                                                 "byte_size": 16}),
           400, "'raw_handle'")
    _error(http(url, "/v2/cudasharedmemory/region/c/register",
                {"raw_handle": {"b64": "not base64!"}, "device_id": 0, "byte_size": 16}),
           400, "base64")
    _error(http(url, "/v2/cudasharedmemory/region/c/status"), 404, "'c'")
    assert http(url, "/v2/cudasharedmemory/status").json() == []
    assert http(url, "/v2/cudasharedmemory/unregister", b"").status == 200


# --- model repository -----------------------------------------------------------------


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[int, Path]:
    """Two versions of one model: output = input + 1, and output = input + 2."""
    folder = tmp_path_factory.mktemp("versions")
    return {k: offset_net(folder / f"plus{k}.onnx", float(k), 4) for k in (1, 2)}


def _offset(c: httpclient.InferenceServerClient) -> tuple[float, str]:
    x = np.random.default_rng(0).standard_normal((1, 4)).astype(np.float32)
    tensor = httpclient.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    result = c.infer("m", [tensor])
    offsets = np.unique(np.round(result.as_numpy("output") - x, 4))
    assert offsets.size == 1, offsets
    return float(offsets[0]), result.get_response()["model_version"]


def test_tritonclient_http_indexes_loads_reloads_and_unloads(versions):
    config = server_config(ModelConfig(name="m", path=str(versions[1]), workers=1),
                           http_port=free_port())
    with running_server(config) as s:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{s.server.http_port}")
        try:
            assert c.get_model_repository_index() == [
                {"name": "m", "version": "1", "state": "READY", "reason": ""}]
            c.unload_model("m")
            assert not c.is_model_ready("m")
            [entry] = c.get_model_repository_index()
            assert (entry["state"], entry["reason"]) == ("UNAVAILABLE", "unloaded")
            url = f"127.0.0.1:{s.server.http_port}"
            assert http(url, "/v2/repository/index", {"ready": True}).json() == []
            c.load_model("m")
            assert c.is_model_ready("m") and _offset(c) == (1.0, "2")
            # A load of a loaded model reloads it; the `path` parameter names another file.
            answer = http(url, "/v2/repository/models/m/load",
                          {"parameters": {"path": str(versions[2])}})
            assert answer.status == 200, answer.body
            assert _offset(c) == (2.0, "3")
            assert "model_repository" in c.get_server_metadata()["extensions"]
        finally:
            c.close()


def test_repository_errors_name_what_was_wrong(versions, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    config = server_config(ModelConfig(name="m", path=str(versions[1]), workers=1),
                           http_port=free_port())
    with running_server(config) as s:
        url = f"127.0.0.1:{s.server.http_port}"
        load = "/v2/repository/models/m/load"
        # tritonclient's `config` parameter: not a trtserve parameter.
        _error(http(url, load, {"parameters": {"config": "{}"}}), 400, "'config'")
        _error(http(url, load, {"parameters": {"path": ""}}), 400, "'path'")
        _error(http(url, load, {"parameters": {"path": 3}}), 400, "'path'")
        _error(http(url, load, {"parameters": {"path": [1]}}), 400, "'path'")
        _error(http(url, load, {"parameters": "path"}), 400, "'parameters'")
        _error(http(url, load, b"[1]"), 400, "JSON object")
        _error(http(url, "/v2/repository/index", {"ready": "yes"}), 400, "'ready'")
        _error(http(url, "/v2/repository/models/m/unload", {"parameters": {"x": True}}), 400,
               "'x'")
        # A failing reload: 400 (FAILED_PRECONDITION) saying why; the old version serves on.
        _error(http(url, load, {"parameters": {"path": str(broken)}}), 400, "still serves")
        _error(http(url, "/v2/repository/models/new/load", b""), 404, "new")
        c = httpclient.InferenceServerClient(url)
        assert _offset(c) == (1.0, "1")
        with pytest.raises(InferenceServerException) as err:
            c.load_model("m", config="{}")
        assert err.value.status() == "400" and "'config'" in err.value.message()
        c.close()


def test_model_control_off_is_403_and_the_index_still_answers(versions):
    config = server_config(ModelConfig(name="m", path=str(versions[1]), workers=1),
                           http_port=free_port(), model_control=False)
    with running_server(config) as s:
        url = f"127.0.0.1:{s.server.http_port}"
        for path in ("/v2/repository/models/m/load", "/v2/repository/models/m/unload"):
            _error(http(url, path, b""), 403, "model_control")
        assert [m["state"] for m in http(url, "/v2/repository/index", b"").json()] == ["READY"]

