"""What one request, and all requests together, may cost: per-model input bounds, the byte budget.

Per-model bounds (`max_input_bytes`, `max_input_shapes`) are checked on a real
ONNX model with dynamic height and width, over both protocols; the server-wide
budget of request bytes in flight with the controlled double held at its gate,
so that the bytes in flight are exactly those of the requests the test sent.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from tests.doubles.controlled import ControlledBackend, controlled_model, expected
from tests.reliability.harness import model_stats, serve_controlled, wait_for
from trtserve.client import AsyncClient, Client, InferenceError, KServeClient
from trtserve.service.config import ModelConfig, load_toml
from trtserve.service.errors import ConfigError
from trtserve.service.limits import ByteBudget
from trtserve.service.testing.onnx_models import CONV_INPUT, CONV_OUTPUT, conv_net
from trtserve.service.testing.servers import free_port, running_server, server_config

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def conv_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return conv_net(tmp_path_factory.mktemp("limits") / "conv.onnx", dynamic_spatial=True)


def image(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def refused(call, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    with pytest.raises(InferenceError) as err:
        call()
    assert err.value.code == code, err.value
    return err.value.details


def test_input_bytes_and_dimension_bounds_are_invalid_argument_naming_the_bound(conv_onnx):
    reference = ort.InferenceSession(str(conv_onnx), providers=["CPUExecutionProvider"])
    model = ModelConfig("conv", str(conv_onnx), workers=1, max_input_bytes=100_000,
                        max_input_shapes={CONV_INPUT: (0, 3, 96, 96)})
    with running_server(server_config(model)) as s, Client(s.url) as c, \
            KServeClient(s.url) as k:
        ok = image(1, 3, 90, 90)  # 97,200 bytes, every dimension within its bound
        want = reference.run([CONV_OUTPUT], {CONV_INPUT: ok})[0]
        for infer in (c.infer, k.infer):
            np.testing.assert_allclose(infer("conv", {CONV_INPUT: ok})[CONV_OUTPUT], want,
                                       rtol=1e-5, atol=1e-6)
            two = image(2, 3, 90, 90)  # 194,400 bytes
            details = refused(lambda infer=infer, two=two: infer("conv", {CONV_INPUT: two}))
            assert details == ("tensor 'image': 194400 bytes of shape [2, 3, 90, 90] is more "
                               "than models.conv.max_input_bytes = 100000 bytes per input")
            tall = image(1, 3, 97, 40)  # 46,560 bytes: only its height is out of bounds
            details = refused(lambda infer=infer, tall=tall: infer("conv", {CONV_INPUT: tall}))
            assert "tensor 'image': shape [1, 3, 97, 40] is larger than [0, 3, 96, 96] in " \
                   "dimension 2 (97 > 96; models.conv.max_input_shapes" in details
            # Every dimension within bounds but the height: the bound is per dimension.
            wide = image(1, 3, 40, 96)
            np.testing.assert_allclose(
                infer("conv", {CONV_INPUT: wide})[CONV_OUTPUT],
                reference.run([CONV_OUTPUT], {CONV_INPUT: wide})[0], rtol=1e-5, atol=1e-6)
        # Refused before any work: the model accepted only the four valid requests.
        assert model_stats(s.url, "conv").requests == 4


def test_by_default_a_model_refuses_an_input_over_64_mib(conv_onnx):
    """The 12 GB case of the issue: a request near the message limit is refused unrun."""
    server = server_config(ModelConfig("conv", str(conv_onnx), workers=1),
                           max_receive_message_bytes=128 * MIB)
    with running_server(server) as s, Client(s.url, max_message_bytes=128 * MIB) as c:
        big = np.zeros((1, 3, 2400, 2400), np.float32)  # 65.9 MiB
        details = refused(lambda: c.infer("conv", {CONV_INPUT: big}, timeout=60))
        assert "69120000 bytes (65.9 MiB)" in details
        assert "models.conv.max_input_bytes = 67108864 bytes (64.0 MiB)" in details
        assert c.infer("conv", {CONV_INPUT: image(1, 3, 32, 32)})[CONV_OUTPUT].shape == (1, 10)
        assert model_stats(s.url, "conv").requests == 1


def test_dimension_bounds_must_name_inputs_of_the_model_with_their_rank():
    double = ControlledBackend()
    with pytest.raises(ConfigError, match=r"models\.controlled\.max_input_shapes: got a bound "
                                          r"for 'nope', but model 'controlled' takes \['x'\]"):
        double.runtime(controlled_model(max_input_shapes={"nope": (0, 8)}))
    with pytest.raises(ConfigError, match=r"models\.controlled\.max_input_shapes\.x: got "
                                          r"\[0, 8, 8\], expected 2 sizes"):
        double.runtime(controlled_model(max_input_shapes={"x": (0, 8, 8)}))
    with pytest.raises(ConfigError, match=r"models\.controlled\.max_input_shapes\.x: got "
                                          r"\[0, -1\], expected sizes of 0"):
        controlled_model(max_input_shapes={"x": (0, -1)})
    with pytest.raises(ConfigError, match=r"models\.controlled\.max_input_bytes: got -1"):
        controlled_model(max_input_bytes=-1)
    with pytest.raises(ConfigError, match=r"server\.max_request_bytes_in_flight: got -5"):
        server_config(max_request_bytes_in_flight=-5)


def test_limits_load_from_toml(tmp_path):
    path = tmp_path / "server.toml"
    path.write_text('[server]\nmax_request_bytes_in_flight = 1048576\n\n'
                    '[[models]]\nname = "det"\npath = "det.onnx"\nmax_input_bytes = 4096\n'
                    'max_input_shapes = { images = [1, 3, 2048, 2048] }\n')
    config = load_toml(path)
    assert config.max_request_bytes_in_flight == MIB
    assert config.models[0].max_input_bytes == 4096
    assert config.models[0].max_input_shapes == {"images": (1, 3, 2048, 2048)}
    path.write_text('[[models]]\nname = "det"\npath = "det.onnx"\n'
                    'max_input_shapes = { images = [1, "x"] }\n')
    with pytest.raises(ConfigError, match=r"models\[0\]\.max_input_shapes\.images\[1\]: "
                                          r"expected int, got 'x'"):
        load_toml(path)


def x_of(rows: int, start: float = 0.0) -> np.ndarray:
    return (start + np.arange(rows * 8, dtype=np.float32)).reshape(rows, 8)


def test_request_bytes_in_flight_beyond_the_budget_are_resource_exhausted():
    # 32 bytes a row; the budget holds 32 rows. The worker is held, so every
    # accepted request keeps its bytes until the test releases it.
    with serve_controlled(server={"max_request_bytes_in_flight": 1024},
                          max_batch_size=64, max_queue_delay_us=0) as s:
        s.controls.hold()
        budget = s.server.server.budget

        def held() -> int:
            async def read() -> int:
                return budget.held_bytes
            return s.server.call(read())

        async def scenario():
            async with AsyncClient(s.url) as c:
                first = asyncio.create_task(c.infer("controlled", {"x": x_of(16, 0)}))
                await asyncio.to_thread(wait_for, lambda: held() == 512)
                # 512 + 640 > 1024 on both protocols and on a stream.
                errors = []
                try:
                    await c.infer("controlled", {"x": x_of(20, 100)})
                except InferenceError as e:
                    errors.append(e)
                with KServeClient(s.url) as k:
                    try:
                        await asyncio.to_thread(k.infer, "controlled", {"x": x_of(20, 100)})
                    except InferenceError as e:
                        errors.append(e)
                async with c.stream() as stream:
                    try:
                        await stream.infer("controlled", {"x": x_of(20, 100)})
                    except InferenceError as e:
                        errors.append(e)
                    # The stream carries on: a request that fits is accepted on it.
                    second = asyncio.create_task(
                        stream.infer("controlled", {"x": x_of(8, 200)}))
                    await asyncio.to_thread(wait_for, lambda: held() == 768)
                    # Larger than the whole budget: can never be accepted.
                    try:
                        await c.infer("controlled", {"x": x_of(33, 300)})
                    except InferenceError as e:
                        errors.append(e)
                    # Bytes are released however a request ends: deadline, cancellation.
                    try:
                        await c.infer("controlled", {"x": x_of(4, 400)}, timeout=0.3)
                    except InferenceError as e:
                        errors.append(e)
                    await asyncio.to_thread(wait_for, lambda: held() == 768)
                    cancelled = asyncio.create_task(c.infer("controlled", {"x": x_of(4, 500)}))
                    await asyncio.to_thread(wait_for, lambda: held() == 896)
                    cancelled.cancel()
                    await asyncio.to_thread(wait_for, lambda: held() == 768)
                    s.controls.release()
                    answers = [await first, await second]
                return answers, errors

        answers, errors = asyncio.run(scenario())
        np.testing.assert_array_equal(answers[0]["y"], expected(x_of(16, 0)))
        np.testing.assert_array_equal(answers[1]["y"], expected(x_of(8, 200)))
        codes = [e.code for e in errors]
        assert codes == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 4 + \
            [grpc.StatusCode.DEADLINE_EXCEEDED], errors
        for e in errors[:3]:
            assert e.details == ("too many request bytes in flight: 512 bytes held, this "
                                 "request needs 640 bytes more (max_request_bytes_in_flight "
                                 "= 1024 bytes); retry later"), e.details
        assert errors[3].details == ("request of 1056 bytes of input tensors is larger than the "
                                     "server's whole budget (max_request_bytes_in_flight = "
                                     "1024 bytes)")
        wait_for(lambda: held() == 0)
        assert budget.refused == 4
        # The whole budget is free again: a request of exactly the budget runs.
        with Client(s.url) as c:
            np.testing.assert_array_equal(c.infer("controlled", {"x": x_of(32, 7)})["y"],
                                          expected(x_of(32, 7)))
        assert held() == 0
        # The refused requests never reached the model: 16 + 8 + 4 + 4 + 32 rows did.
        assert model_stats(s.url).requests == 5


def test_after_a_large_request_however_it_ended_memory_is_given_back(conv_onnx):
    model = ModelConfig("conv", str(conv_onnx), workers=1)
    with running_server(server_config(model, trim_after_request_bytes=4 * MIB)) as s, \
            Client(s.url) as c:
        trimmer = s.server.trimmer
        if not trimmer.available:
            pytest.skip("malloc_trim is glibc's")

        def trims() -> int:
            async def read() -> int:
                return trimmer.trims
            return s.call(read())

        # 5.5 MiB with 4 channels where the model takes 3: refused after decoding (a
        # name the model lacks is refused before, by the protocol edge).
        refused(lambda: c.infer("conv", {CONV_INPUT: np.zeros((1, 4, 600, 600), np.float32)}))
        large = np.zeros((1, 3, 600, 600), np.float32)
        wait_for(lambda: trims() == 1, show=trims)
        assert c.infer("conv", {CONV_INPUT: large})[CONV_OUTPUT].shape == (1, 10)
        wait_for(lambda: trims() == 2, show=trims)
        # Refused by the protocol edge (a name the model lacks), before the engine and
        # its byte budget: given back all the same, by the servicer's refusal hook.
        refused(lambda: c.infer("conv", {"images": large}))
        wait_for(lambda: trims() == 3, show=trims)


def test_the_budget_reports_large_requests_finished_and_refuses_only_with_a_limit():
    done: list[int] = []
    budget = ByteBudget(0, large_bytes=100, on_large_done=lambda: done.append(1))
    for nbytes in (100, 200, 99):
        budget.finished(nbytes)
    assert len(done) == 2
    budget.acquire(10**12)  # no budget: anything fits
    assert budget.held_bytes == 10**12
    budget.release(10**12)
    assert budget.held_bytes == 0 and budget.refused == 0


def test_prometheus_shows_the_budget_and_its_refusals():
    port = free_port()
    with serve_controlled(server={"max_request_bytes_in_flight": 1024, "metrics_port": port},
                          max_batch_size=64) as s, Client(s.url) as c:
        refused(lambda: c.infer("controlled", {"x": x_of(33)}),
                grpc.StatusCode.RESOURCE_EXHAUSTED)
        np.testing.assert_array_equal(c.infer("controlled", {"x": x_of(2)})["y"],
                                      expected(x_of(2)))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
            lines = page.read().decode().splitlines()
        assert "trtserve_request_bytes_budget 1024.0" in lines
        assert "trtserve_request_bytes_in_flight 0.0" in lines
        assert "trtserve_requests_over_budget_total 1.0" in lines
