"""Made-up inputs: one function for the client, the load generator and the profiler.

Before, `trtserve-client infer` made BF16 inputs as the integers 0-99 taken as
bit patterns: bfloat16 denormals of about 1e-38, not data a model sees.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from trtserve.client import cli
from trtserve.client.dtypes import bf16_to_fp32
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.random_data import random_array
from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import running_server, server_config


def _looks_standard_normal(values: np.ndarray) -> None:
    assert np.isfinite(values).all()
    assert abs(float(values.mean())) < 0.1
    assert 0.9 < float(values.std()) < 1.1
    # bfloat16 keeps 8 bits of mantissa: one in a hundred or so are this close to 0.
    assert np.mean(np.abs(values) < 1e-3) < 0.01


def test_a_bf16_input_of_the_client_is_a_standard_normal_bfloat16():
    md = pb.ModelMetadataResponse(
        name="m", max_batch_size=8,
        inputs=[pb.TensorMetadata(name="x", dtype=pb.DATA_TYPE_BF16, shape=[-1, 1000])])
    bits = cli.random_inputs(md, rows=4)["x"]
    assert bits.dtype == np.uint16 and bits.shape == (4, 1000)
    _looks_standard_normal(bf16_to_fp32(bits))


@pytest.mark.parametrize("dtype", ["FP16", "BF16", "FP32", "FP64"])
def test_floats_of_every_width_are_standard_normal(dtype):
    array = random_array(dtype, (4000,), np.random.default_rng(0))
    values = bf16_to_fp32(array) if dtype == "BF16" else array.astype(np.float64)
    _looks_standard_normal(values)


def test_integers_are_small_and_booleans_take_both_values():
    rng = np.random.default_rng(0)
    ints = random_array("INT64", (1000,), rng)
    assert ints.dtype == np.int64 and ints.min() >= 0 and ints.max() < 100
    flags = random_array("BOOL", (1000,), rng)
    assert flags.dtype == np.bool_ and flags.any() and not flags.all()


def test_the_same_seed_gives_the_same_data_everywhere():
    """The client and the load generator send what the profiler measured."""
    md = pb.ModelMetadataResponse(
        name="m", max_batch_size=8,
        inputs=[pb.TensorMetadata(name="x", dtype=pb.DATA_TYPE_FP32, shape=[-1, 16])])
    sent = cli.random_inputs(md, rows=2, seed=7)["x"]
    np.testing.assert_array_equal(sent, random_array("FP32", (2, 16), np.random.default_rng(7)))


@pytest.fixture(scope="module")
def bf16_served(tmp_path_factory: pytest.TempPathFactory):
    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "bf16", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("models") / "bf16.onnx"
    onnx.save(model, path)
    config = ModelConfig(name="bf16", path=str(path), workers=1, max_worker_failures=1)
    with running_server(server_config(config)) as s:
        yield s


@pytest.mark.parametrize("protocol", ["v1", "kserve"])
def test_infer_sends_random_bf16_inputs_as_bf16(bf16_served, capsys, protocol):
    """Before, they went as UINT16 and the server refused them for their dtype."""
    code = cli.main(["--url", bf16_served.url, "infer", "--model", "bf16", "--protocol", protocol])
    err = capsys.readouterr().err
    assert "UINT16" not in err, err
    # The request reached the model: served, or (ONNX Runtime on the CPU takes no
    # bfloat16 from numpy) refused by the model itself for a reason other than its dtype.
    assert code == 0 or "cannot run this input" in err, err
