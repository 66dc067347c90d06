"""Models that do not batch on the first axis (Triton's max_batch_size 0), over real gRPC.

Issue 19, section 5: two real models that trtserve could not serve, reproduced
by generated ONNX models (service/testing/onnx_models.py): a voice-activity model whose
recurrent state carries the batch on axis 1 beside a scalar sample rate, and a
CTC OCR model fixed at batch 1 whose output comes out in another shape than it
declares. Each request runs alone with its full shapes; answers are checked
against ONNX Runtime run directly on the same file.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from trtserve.client import AsyncClient, Client, InferenceError
from trtserve.client.client import KServeClient
from trtserve.client.gen.inference import model_config_pb2 as mc
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.config import ModelConfig, load_toml
from trtserve.service.engine.repository import load_backend
from trtserve.service.errors import ConfigError
from trtserve.service.testing import onnx_models
from trtserve.service.testing.servers import ServerThread, running_server, server_config

OCR_CLASSES = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("nobatch")
    return {
        "vad": onnx_models.vad(folder / "vad.onnx"),
        "ocr": onnx_models.ctc_ocr(folder / "ocr.onnx", classes=OCR_CLASSES),
        "mlp": onnx_models.mlp(folder / "mlp.onnx"),
    }


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Iterator[ServerThread]:
    """The VAD model, and a batching model beside it: one server serves both kinds."""
    config = server_config(
        ModelConfig(name="vad", path=str(models["vad"]), workers=2, max_queue_delay_us=2000),
        ModelConfig(name="mlp", path=str(models["mlp"]), workers=1),
    )
    with running_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def ocr_server(models: dict[str, Path]) -> Iterator[ServerThread]:
    config = server_config(ModelConfig(name="ocr", path=str(models["ocr"]), workers=1))
    with running_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def mlp1_server(models: dict[str, Path]) -> Iterator[ServerThread]:
    """A model that could batch, told not to."""
    config = server_config(
        ModelConfig(name="mlp1", path=str(models["mlp"]), workers=2, batching=False,
                    max_queue_delay_us=2000))
    with running_server(config) as s:
        yield s


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def vad_request(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    return {
        "audio": rng.standard_normal((n, 512)).astype(np.float32),
        "state": rng.standard_normal((2, n, 128)).astype(np.float32),
        "sr": np.array(rng.choice([8000, 16000]), dtype=np.int64),
    }


def _model_stats(server: ServerThread, name: str) -> pb.ModelStats:
    with Client(server.url) as c:
        return c.stats(name).models[0]


# --- the voice-activity model: batch on axis 1, a scalar input --------------------------


def test_vad_model_is_served_over_both_protocols_to_concurrent_clients(server, models):
    reference = _session(models["vad"])
    rng = np.random.default_rng(7)
    # Differing N: requests of another N must never be stacked with these, and
    # the state's batch axis (1) must never be cut along axis 0.
    requests = [vad_request(rng, int(rng.integers(1, 5))) for _ in range(96)]
    before = _model_stats(server, "vad")

    async def v1_client(chunk: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        async with AsyncClient(server.url) as client:
            return [await client.infer("vad", r) for r in chunk]

    async def v1_all() -> list[list[dict[str, np.ndarray]]]:
        return await asyncio.gather(*(v1_client(requests[i:48:8]) for i in range(8)))

    def kserve_client(chunk: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        with KServeClient(server.url) as k:
            return [k.infer("vad", r) for r in chunk]

    with ThreadPoolExecutor(8) as pool:
        kserve = pool.map(kserve_client, [requests[48 + i::8] for i in range(8)])
        v1 = asyncio.run(v1_all())
        kserve_results = list(kserve)
    answered = [(requests[i:48:8], out) for i, out in enumerate(v1)] + \
        [(requests[48 + i::8], out) for i, out in enumerate(kserve_results)]
    checked = 0
    for chunk, outs in answered:
        assert len(outs) == len(chunk)
        for request, out in zip(chunk, outs, strict=True):
            prob, state = reference.run(["prob", "new_state"], request)
            assert out["prob"].shape == prob.shape == (request["audio"].shape[0], 1)
            assert out["new_state"].shape == state.shape
            np.testing.assert_allclose(out["prob"], prob, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out["new_state"], state, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == len(requests)

    after = _model_stats(server, "vad")
    assert not after.batching
    # One request per execution: never merged, whatever the queue delay.
    assert after.batches - before.batches == after.requests - before.requests == len(requests)
    assert after.errors == 0 and all(w.healthy for w in after.workers)


def test_bad_vad_input_is_invalid_argument_and_the_model_stays_in_service(server, models):
    rng = np.random.default_rng(1)
    good = vad_request(rng, 2)
    with Client(server.url) as c:
        # The state's N (axis 1) disagrees with the audio's N (axis 0): ONNX Runtime
        # would fail the execution, a server error; the model names both "N".
        with pytest.raises(InferenceError) as err:
            c.infer("vad", {**good, "state": np.zeros((2, 3, 128), np.float32)})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'state'" in err.value.details and "'N'" in err.value.details
        # The state's fixed first dimension (2) is checked too: there is no batch axis.
        with pytest.raises(InferenceError) as err:
            c.infer("vad", {**good, "state": np.zeros((3, 2, 128), np.float32)})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'state'" in err.value.details and "dimension 0" in err.value.details
        # The sample rate is a scalar: a [1] tensor is refused by rank.
        with pytest.raises(InferenceError) as err:
            c.infer("vad", {**good, "sr": np.array([16000], np.int64)})
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'sr'" in err.value.details and "0: []" in err.value.details
        out = c.infer("vad", good)
    np.testing.assert_allclose(out["prob"], _session(models["vad"]).run(["prob"], good)[0],
                               rtol=1e-5, atol=1e-6)
    stats = _model_stats(server, "vad")
    assert stats.errors == 0 and all(w.healthy and w.errors == 0 for w in stats.workers)


# --- the OCR model: fixed batch 1, an output shaped otherwise than declared -------------


def test_ocr_outputs_come_back_as_produced_and_the_mismatch_is_logged_once(ocr_server, models,
                                                                          caplog):
    server = ocr_server
    reference = _session(models["ocr"])
    rng = np.random.default_rng(3)
    widths = [16, 40, 16, 7, 64, 16]
    with caplog.at_level(logging.WARNING, logger="trtserve.service.engine.model"), Client(server.url) as c, \
            KServeClient(server.url) as k:
        for i, width in enumerate(widths):
            image = rng.standard_normal((1, 1, 64, width)).astype(np.float32)
            client = c if i % 2 == 0 else k
            out = client.infer("ocr", {onnx_models.OCR_INPUT: image})
            want = reference.run(None, {onnx_models.OCR_INPUT: image})[0]
            assert out[onnx_models.OCR_OUTPUT].shape == (width, 1, OCR_CLASSES) == want.shape
            np.testing.assert_allclose(out[onnx_models.OCR_OUTPUT], want, rtol=1e-5, atol=1e-6)
    warnings = [r for r in caplog.records if "came out with shape" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert f"'{onnx_models.OCR_OUTPUT}'" in warnings[0].getMessage()
    stats = _model_stats(server, "ocr")
    assert stats.errors == 0 and stats.workers[0].healthy and not stats.batching


def test_ocr_refuses_a_second_image_by_its_fixed_first_dimension(ocr_server):
    server = ocr_server
    with Client(server.url) as c, pytest.raises(InferenceError) as err:
        c.infer("ocr", {onnx_models.OCR_INPUT: np.zeros((2, 1, 64, 16), np.float32)})
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "dimension 0" in err.value.details


# --- batching = false on a model that could batch ---------------------------------------


def test_batching_off_runs_every_request_alone(mlp1_server, models):
    server = mlp1_server
    reference = _session(models["mlp"])
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((int(rng.integers(1, 4)), 32)).astype(np.float32)
          for _ in range(40)]
    before = _model_stats(server, "mlp1")

    async def run() -> list[dict[str, np.ndarray]]:
        async with AsyncClient(server.url) as client:
            return await asyncio.gather(*(client.infer("mlp1", {"input": x}) for x in xs))

    outs = asyncio.run(run())
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_allclose(out["output"], reference.run(None, {"input": x})[0],
                                   rtol=1e-5, atol=1e-6)
    after = _model_stats(server, "mlp1")
    assert after.batches - before.batches == len(xs)
    assert set(after.batch_size_histogram) == {1}  # one request per execution
    assert not after.batching
    with Client(server.url) as c:
        md = c.metadata("mlp1")
    assert (md.batching, md.max_batch_size) == (False, 0)
    with KServeClient(server.url) as k:
        config = k.config("mlp1")
    assert config.max_batch_size == 0 and [list(i.dims) for i in config.input] == [[-1, 32]]


# --- how the model is described ----------------------------------------------------------


def test_metadata_and_kserve_config_say_the_model_does_not_batch(server):
    with Client(server.url) as c:
        md = c.metadata("vad")
        batching_md = c.metadata("mlp")
    assert not md.batching and (md.max_batch_size, md.min_batch_size) == (0, 0)
    assert [(t.name, list(t.shape)) for t in md.inputs] == [
        ("audio", [-1, 512]), ("state", [2, -1, 128]), ("sr", [])]
    assert batching_md.batching and batching_md.max_batch_size == 64
    with KServeClient(server.url) as k:
        config = k.config("vad")
        metadata = k.metadata("vad")
    assert config.max_batch_size == 0
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("audio", "TYPE_FP32", [-1, 512]), ("state", "TYPE_FP32", [2, -1, 128]),
        ("sr", "TYPE_INT64", [])]
    assert [list(o.dims) for o in config.output] == [[-1, 1], [2, -1, 128]]
    assert config.WhichOneof("scheduling_choice") is None  # no dynamic batcher described
    assert [list(t.shape) for t in metadata.inputs] == [[-1, 512], [2, -1, 128], []]


def test_cli_says_so_and_infers_with_full_shapes(server, capsys):
    import json

    from trtserve.client import cli

    assert cli.main(["--url", server.url, "metadata", "--model", "vad"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["batching"] is False
    assert cli.main(["--url", server.url, "stats", "--model", "vad"]) == 0
    assert "not batching" in capsys.readouterr().out
    for protocol in ("v1", "kserve"):
        assert cli.main(["--url", server.url, "infer", "--model", "vad", "--rows", "3",
                         "--protocol", protocol]) == 0
        out = capsys.readouterr().out
        # Random inputs of the full shapes (dynamic dims cli.DEFAULT_DYNAMIC_DIM, 64):
        # prob [64, 1]; --rows does not apply.
        assert "prob: dtype=float32 shape=[64, 1]" in out, out
        assert "new_state: dtype=float32 shape=[2, 64, 128]" in out, out


# --- configuration -----------------------------------------------------------------------


def test_the_loader_decides_and_the_config_can_only_turn_batching_off(models):
    assert not load_backend(ModelConfig(name="v", path=str(models["vad"]))).spec.batching
    assert not load_backend(ModelConfig(name="o", path=str(models["ocr"]))).spec.batching
    assert load_backend(ModelConfig(name="m", path=str(models["mlp"]))).spec.batching
    assert not load_backend(ModelConfig(name="m", path=str(models["mlp"]),
                                        batching=False)).spec.batching
    with pytest.raises(ConfigError, match=r"models\.v\.batching: got true.*tensor 'state'"):
        load_backend(ModelConfig(name="v", path=str(models["vad"]), batching=True))
    with pytest.raises(ConfigError, match=r"models\.o\.max_batch_size: got 8"):
        load_backend(ModelConfig(name="o", path=str(models["ocr"]), max_batch_size=8))


def test_batching_key_in_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[[models]]\nname = "a"\npath = "a.onnx"\nbatching = false\n'
                    '[[models]]\nname = "b"\npath = "b.onnx"\n'
                    '[[models]]\nname = "c"\npath = "c.onnx"\nbatching = "auto"\n')
    assert [m.batching for m in load_toml(path).models] == [False, "auto", "auto"]
    for bad in ('"no"', "1"):
        path.write_text(f'[[models]]\nname = "a"\npath = "a.onnx"\nbatching = {bad}\n')
        with pytest.raises(ConfigError, match=r"batching"):
            load_toml(path)


def test_batching_flag(models):
    import argparse

    from trtserve.service.cli import add_serve, build_config

    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", f"m={models['mlp']}", "--batching", "off"])
    assert build_config(args).models[0].batching is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--batching", "sometimes"])

