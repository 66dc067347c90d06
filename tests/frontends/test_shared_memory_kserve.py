"""KServe's system shared-memory extension, driven by tritonclient exactly as a Triton
user drives it: `tritonclient.utils.shared_memory` creates the regions, the gRPC
client registers them and names them in inputs and outputs. Real gRPC on loopback,
real ONNX Runtime, real POSIX shared memory.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from tests.doubles.controlled import INPUT, OUTPUT, WIDTH, ControlledBackend, controlled_model
from trtserve.service.config import ModelConfig, SharedMemoryConfig
from trtserve.service.testing.servers import running_server, server_config

ROWS, FEATURES, OUT = 4, 64, 16
IN_BYTES, OUT_BYTES = ROWS * FEATURES * 4, ROWS * OUT * 4


@pytest.fixture(scope="module")
def server(example_onnx):
    config = server_config(
        ModelConfig(name="example", path=str(example_onnx), workers=1, max_batch_size=32),
        # Holds a lone request in the queue for a minute: a region stays in use.
        ModelConfig(name="slow", path=str(example_onnx), workers=1, max_batch_size=32,
                    max_queue_delay_us=60_000_000, preferred_batch_sizes=(32,)),
        shared_memory=SharedMemoryConfig(max_regions=4, max_mapped_bytes=1 << 20))
    with running_server(config) as s:
        yield s


@pytest.fixture
def client(server):
    c = triton.InferenceServerClient(server.url)
    c.unregister_system_shared_memory()
    yield c
    c.unregister_system_shared_memory()
    c.close()


@pytest.fixture
def regions():
    """Creates regions with unique keys; destroys them after the test."""
    made = []

    def make(byte_size: int) -> tuple[str, str, shm.SharedMemoryRegion]:
        tag = uuid.uuid4().hex[:12]
        name, key = f"region-{tag}", f"/trtserve-test-{tag}"
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


def _shm_input(name: str, byte_size: int = IN_BYTES, offset: int = 0,
               shape: tuple[int, ...] = (ROWS, FEATURES)) -> triton.InferInput:
    tensor = triton.InferInput("input", list(shape), "FP32")
    tensor.set_shared_memory(name, byte_size, offset)
    return tensor


def _shm_output(name: str, byte_size: int = OUT_BYTES, offset: int = 0
                ) -> triton.InferRequestedOutput:
    output = triton.InferRequestedOutput("output")
    output.set_shared_memory(name, byte_size, offset)
    return output


def _code(error: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(error.value.status())


def test_inputs_and_outputs_in_system_shared_memory(client, regions, reference):
    # (Prometheus' view of the same counters: test_prometheus_counts_shared_memory.)
    in_name, in_key, in_handle = regions(IN_BYTES)
    out_name, out_key, out_handle = regions(OUT_BYTES)
    x = _x()
    shm.set_shared_memory_region(in_handle, [x])
    client.register_system_shared_memory(in_name, in_key, IN_BYTES)
    client.register_system_shared_memory(out_name, out_key, OUT_BYTES)

    result = client.infer("example", [_shm_input(in_name)], outputs=[_shm_output(out_name)])

    output = result.get_output("output")
    assert (output.datatype, list(output.shape)) == ("FP32", [ROWS, OUT])
    # Nothing came back over gRPC: the bytes are in the client's region.
    assert result.get_response().raw_output_contents == [b""]
    got = shm.get_contents_as_numpy(out_handle, np.float32, [ROWS, OUT])
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)


def test_shared_memory_input_with_a_wire_output_and_an_offset(client, regions, reference):
    name, key, handle = regions(2 * IN_BYTES)
    x = _x(1)
    shm.set_shared_memory_region(handle, [x], offset=IN_BYTES)
    client.register_system_shared_memory(name, key, 2 * IN_BYTES)
    result = client.infer("example", [_shm_input(name, offset=IN_BYTES)])
    np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5, atol=1e-5)


def test_a_region_registered_at_an_offset_of_its_object(client, regions, reference):
    # Register the second half only: references count from the region's start.
    name, key, handle = regions(2 * IN_BYTES)
    x = _x(2)
    shm.set_shared_memory_region(handle, [x], offset=IN_BYTES)
    client.register_system_shared_memory(name, key, IN_BYTES, offset=IN_BYTES)
    result = client.infer("example", [_shm_input(name)])
    np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5, atol=1e-5)


def test_status_lists_registered_regions_and_unregister_removes_them(client, regions):
    name, key, _ = regions(IN_BYTES)
    client.register_system_shared_memory(name, key, IN_BYTES)
    status = client.get_system_shared_memory_status(as_json=True)["regions"]
    assert status[name] == {"name": name, "key": key, "byte_size": str(IN_BYTES)}
    one = client.get_system_shared_memory_status(name, as_json=True)["regions"]
    assert list(one) == [name]
    # Registering the name again is refused; the region stays as it was.
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(name, key, IN_BYTES)
    assert _code(e) == "StatusCode.ALREADY_EXISTS"
    client.unregister_system_shared_memory(name)
    assert client.get_system_shared_memory_status(as_json=True) == {}
    with pytest.raises(InferenceServerException) as e:
        client.get_system_shared_memory_status(name)
    assert _code(e) == "StatusCode.NOT_FOUND"
    # As in Triton: unregistering a name that is not registered is no error.
    client.unregister_system_shared_memory(name)


@pytest.mark.parametrize(("key", "words"), [
    ("/trtserve-no-such-key", "cannot open key '/trtserve-no-such-key'"),
    ("/../etc/passwd", "is not a shared-memory key"),
    ("", "is not a shared-memory key"),
])
def test_keys_that_cannot_be_opened_are_invalid_argument(client, key, words):
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory("bad", key, 64)
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    assert words in e.value.message()
    assert client.get_system_shared_memory_status(as_json=True) == {}


def test_a_region_larger_than_its_object_is_refused(client, regions):
    # Mapping past the object's end would be SIGBUS on the first read.
    name, key, _ = regions(IN_BYTES)
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(name, key, IN_BYTES, offset=64)
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    assert f"holds {IN_BYTES} bytes, but offset 64 + byte size {IN_BYTES}" in e.value.message()


def test_limits_on_regions_and_mapped_bytes(client, regions):
    name, key, _ = regions(1 << 20)
    client.register_system_shared_memory(name, key, 1 << 20)
    other, other_key, _ = regions(64)
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(other, other_key, 64)
    assert _code(e) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "server.shared_memory.max_mapped_bytes = 1048576" in e.value.message()
    client.unregister_system_shared_memory(name)
    for i in range(4):
        client.register_system_shared_memory(f"{other}-{i}", other_key, 64)
    with pytest.raises(InferenceServerException) as e:
        client.register_system_shared_memory(other, other_key, 64)
    assert _code(e) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "server.shared_memory.max_regions = 4" in e.value.message()


def _refused(client, inputs, outputs=None) -> str:
    with pytest.raises(InferenceServerException) as e:
        client.infer("example", inputs, outputs=outputs)
    assert _code(e) == "StatusCode.INVALID_ARGUMENT", e.value.message()
    return e.value.message()


def test_every_bad_reference_is_invalid_argument_and_the_server_keeps_serving(
        client, regions, reference):
    name, key, handle = regions(IN_BYTES)
    client.register_system_shared_memory(name, key, IN_BYTES)
    x = _x(3)
    shm.set_shared_memory_region(handle, [x])

    assert "shared-memory region 'nope' is not registered" in _refused(
        client, [_shm_input("nope")])
    assert (f"region '{name}' holds {IN_BYTES} bytes, but offset 16 + byte size {IN_BYTES}"
            in _refused(client, [_shm_input(name, offset=16)]))
    assert (f"offset 0 + byte size {IN_BYTES + 4} = {IN_BYTES + 4} reaches past its end"
            in _refused(client, [_shm_input(name, byte_size=IN_BYTES + 4)]))
    assert ("shared-memory byte size 512 does not match shape [4, 64] of FP32, which needs "
            "1024 bytes" in _refused(client, [_shm_input(name, byte_size=512)]))
    assert "output 'output': shared-memory region 'gone' is not registered" in _refused(
        client, [_shm_input(name)], [_shm_output("gone")])
    # An output region too small for the output: refused once its size is known.
    small, small_key, _ = regions(16)
    client.register_system_shared_memory(small, small_key, 16)
    assert "more than the 16 bytes given in shared-memory region" in _refused(
        client, [_shm_input(name)], [_shm_output(small, byte_size=16)])

    result = client.infer("example", [_shm_input(name)])
    np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5, atol=1e-5)
    usage = client.get_system_shared_memory_status(name, as_json=True)["regions"][name]
    assert usage["byte_size"] == str(IN_BYTES)


def test_a_truncated_object_is_refused_not_a_crash(client, regions, reference):
    name, key, _ = regions(IN_BYTES)
    client.register_system_shared_memory(name, key, IN_BYTES)
    os.truncate(f"/dev/shm/{key.lstrip('/')}", 16)
    message = _refused(client, [_shm_input(name)])
    assert f"holds 16 bytes, but offset 0 + byte size {IN_BYTES}" in message
    x = _x(4)
    result = client.infer("example", [triton.InferInput("input", [ROWS, FEATURES], "FP32")
                                      .set_data_from_numpy(x)])
    np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5, atol=1e-5)


def test_unregister_while_in_use_is_refused_until_the_request_is_answered(
        server, client, regions, reference):
    name, key, handle = regions(IN_BYTES)
    x = _x(5)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory(name, key, IN_BYTES)
    answered: list[object] = []
    # "slow" holds the lone request in its queue (a minute's delay, batches of 32).
    call = threading.Thread(target=lambda: answered.append(
        _infer_or_error(client, "slow", [_shm_input(name)], timeout_s=3)))
    call.start()
    try:
        _wait_until_in_use(server, name)
        with pytest.raises(InferenceServerException) as e:
            client.unregister_system_shared_memory(name)
        assert _code(e) == "StatusCode.FAILED_PRECONDITION"
        assert f"'{name}' (1)" in e.value.message()
        with pytest.raises(InferenceServerException) as e:
            client.unregister_system_shared_memory()
        assert _code(e) == "StatusCode.FAILED_PRECONDITION"
        assert name in client.get_system_shared_memory_status(as_json=True)["regions"]
    finally:
        call.join(30)
    # The call's deadline dropped the request: the region is free again.
    assert isinstance(answered[0], InferenceServerException)
    _wait_until_in_use(server, name, count=0)
    client.unregister_system_shared_memory(name)
    result = client.infer("example", [triton.InferInput("input", [ROWS, FEATURES], "FP32")
                                      .set_data_from_numpy(x)])
    np.testing.assert_allclose(result.as_numpy("output"), reference(x), rtol=1e-5, atol=1e-5)


def _infer_or_error(client, model, inputs, timeout_s):
    try:
        return client.infer(model, inputs, client_timeout=timeout_s)
    except InferenceServerException as e:
        return e


def _wait_until_in_use(server, name: str, count: int = 1) -> None:
    import time

    end = time.monotonic() + 30
    while time.monotonic() < end:
        statuses = server.call(_status(server, name))
        if statuses and statuses[0].in_use == count:
            return
        time.sleep(0.01)
    raise AssertionError(f"region {name} never had {count} request(s) using it")


async def _status(server, name):
    return server.server.engine.regions.status(name)


def _non_loopback_address() -> str | None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: picks the outgoing address
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_register_is_refused_from_another_host_unless_configured(example_onnx, regions):
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address but loopback")
    name, key, _ = regions(IN_BYTES)
    model = ModelConfig(name="example", path=str(example_onnx), workers=1)
    for allow in (False, True):
        config = server_config(model, host="0.0.0.0",
                               shared_memory=SharedMemoryConfig(allow_remote_register=allow))
        with running_server(config) as s:
            remote = triton.InferenceServerClient(f"{address}:{s.port}")
            try:
                if allow:
                    remote.register_system_shared_memory(name, key, IN_BYTES)
                    continue
                with pytest.raises(InferenceServerException) as e:
                    remote.register_system_shared_memory(name, key, IN_BYTES)
                assert _code(e) == "StatusCode.PERMISSION_DENIED"
                assert "only from callers on this host" in e.value.message()
                # The same call over loopback is taken.
                local = triton.InferenceServerClient(f"127.0.0.1:{s.port}")
                local.register_system_shared_memory(name, key, IN_BYTES)
                local.close()
            finally:
                remote.close()


def test_register_needs_the_token_when_auth_is_on(example_onnx, regions, monkeypatch):
    monkeypatch.setenv("TRTSERVE_AUTH_TOKEN", "s3cret")
    name, key, _ = regions(IN_BYTES)
    model = ModelConfig(name="example", path=str(example_onnx), workers=1)
    with running_server(server_config(model)) as s:
        c = triton.InferenceServerClient(s.url)
        for call in (lambda h: c.register_system_shared_memory(name, key, IN_BYTES, headers=h),
                     lambda h: c.get_system_shared_memory_status(headers=h),
                     lambda h: c.unregister_system_shared_memory(headers=h)):
            with pytest.raises(InferenceServerException) as e:
                call({})
            assert _code(e) == "StatusCode.UNAUTHENTICATED"
            call({"authorization": "Bearer s3cret"})
        c.close()


def test_shared_memory_over_model_stream_infer(client, regions, reference):
    import queue

    name, key, handle = regions(IN_BYTES + OUT_BYTES)
    x = _x(6)
    shm.set_shared_memory_region(handle, [x])
    client.register_system_shared_memory(name, key, IN_BYTES + OUT_BYTES)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        client.async_stream_infer("example", [_shm_input(name)],
                                  outputs=[_shm_output(name, offset=IN_BYTES)], request_id="a")
        client.async_stream_infer("example", [_shm_input("nope")], request_id="b")
        got = dict.fromkeys(("a", "b"))
        for _ in range(2):
            result, error = answers.get(timeout=30)
            if error is None:
                got[result.get_response().id] = result
            else:
                got["b"] = error
    finally:
        client.stop_stream()
    assert got["a"].get_output("output").shape == [ROWS, OUT]
    np.testing.assert_allclose(
        shm.get_contents_as_numpy(handle, np.float32, [ROWS, OUT], offset=IN_BYTES),
        reference(x), rtol=1e-5, atol=1e-5)
    assert "shared-memory region 'nope' is not registered" in str(got["b"])


def test_prometheus_counts_shared_memory(example_onnx, regions):
    import urllib.request

    from trtserve.service.testing.servers import free_port

    port = free_port()
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1),
                           metrics_port=port)
    name, key, handle = regions(IN_BYTES + OUT_BYTES)
    shm.set_shared_memory_region(handle, [_x(7)])
    with running_server(config) as s:
        c = triton.InferenceServerClient(s.url)
        c.register_system_shared_memory(name, key, IN_BYTES + OUT_BYTES)
        c.infer("example", [_shm_input(name)], outputs=[_shm_output(name, offset=IN_BYTES)])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            lines = page.read().decode().splitlines()
        c.unregister_system_shared_memory()
        c.close()
    assert "trtserve_shared_memory_regions 1.0" in lines
    assert f"trtserve_shared_memory_mapped_bytes {float(IN_BYTES + OUT_BYTES)}" in lines
    assert f"trtserve_shared_memory_input_bytes_total {float(IN_BYTES)}" in lines
    assert f"trtserve_shared_memory_output_bytes_total {float(OUT_BYTES)}" in lines
    # Read through the object's descriptor (the default, "copy"): no view of it.
    assert "trtserve_shared_memory_zero_copy_inputs_total 0.0" in lines
    assert "trtserve_shared_memory_host_copies_total 0.0" in lines


@pytest.mark.parametrize("ends_by", ["cancel", "deadline"])
def test_a_region_stays_registered_until_the_batch_of_a_cancelled_request_is_done(
        regions, ends_by):
    """The client's answer comes while its batch is still held on the worker; the region
    is refused to Unregister until that batch is done, then unregisters as usual."""
    backend = ControlledBackend()
    controls = backend.controls
    with running_server(server_config()) as server:
        server.call(server.server.add_model(backend.runtime(controlled_model(
            "controlled", max_queue_delay_us=0))))
        client = triton.InferenceServerClient(server.url)
        rows_bytes = 2 * WIDTH * 4
        name, key, handle = regions(2 * rows_bytes)
        shm.set_shared_memory_region(handle, [np.ones((2, WIDTH), np.float32)])
        client.register_system_shared_memory(name, key, 2 * rows_bytes)
        x = triton.InferInput(INPUT, [2, WIDTH], "FP32")
        x.set_shared_memory(name, rows_bytes)
        y = triton.InferRequestedOutput(OUTPUT)
        y.set_shared_memory(name, rows_bytes, rows_bytes)
        answers: queue.Queue[object] = queue.Queue()
        controls.hold()
        try:
            call = client.async_infer(
                "controlled", [x], lambda result, error: answers.put(error or result),
                outputs=[y], client_timeout=3 if ends_by == "deadline" else None)
            assert controls.started.wait(30)  # the batch is on the worker, held there
            if ends_by == "cancel":
                call.cancel()
            answer = answers.get(timeout=30)  # while the batch is still held
            assert isinstance(answer, InferenceServerException)
            assert str(answer.status()) == ("StatusCode.CANCELLED" if ends_by == "cancel"
                                            else "StatusCode.DEADLINE_EXCEEDED")
            (status,) = server.call(_status(server, name))
            assert status.in_use == 2  # its input and its output, still the batch's
            for unregister in (lambda: client.unregister_system_shared_memory(name),
                               client.unregister_system_shared_memory):
                with pytest.raises(InferenceServerException) as refused:
                    unregister()
                assert _code(refused) == "StatusCode.FAILED_PRECONDITION"
                assert f"'{name}' (2)" in refused.value.message()
        finally:
            controls.release()
        _wait_until_in_use(server, name, count=0)
        client.unregister_system_shared_memory(name)
        assert client.get_system_shared_memory_status(as_json=True).get("regions", {}) == {}
        client.close()
