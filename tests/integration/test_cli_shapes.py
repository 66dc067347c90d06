"""`trtserve-client infer` without an input makes one the model can run.

Before, every dynamic dimension was 1: a model whose dynamic sizes must be
multiples of 32 (service/testing/onnx_models.tiled_net) failed each such call, and the
README's smoke test took the model down by itself.
"""

from __future__ import annotations

import numpy as np
import pytest

from trtserve.client import cli
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.config import ModelConfig
from trtserve.service.testing.onnx_models import tiled_net
from trtserve.service.testing.servers import running_server, server_config


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    path = tiled_net(tmp_path_factory.mktemp("models") / "tiled.onnx")
    model = ModelConfig(name="tiled", path=str(path), workers=1, max_worker_failures=1)
    with running_server(server_config(model)) as s:
        yield s


def test_infer_without_input_picks_sizes_the_model_runs(served, capsys):
    for protocol in ("v1", "kserve"):
        assert cli.main(["--url", served.url, "infer", "--model", "tiled",
                         "--protocol", protocol]) == 0, capsys.readouterr().err
        # 64 x 64 pixels: four tiles of 1024.
        assert "tiles: dtype=float32 shape=[1, 4, 1024]" in capsys.readouterr().out


def test_shape_chooses_the_size(served, capsys):
    assert cli.main(["--url", served.url, "infer", "--model", "tiled",
                     "--shape", "image=2x1x32x96"]) == 0, capsys.readouterr().err
    assert "tiles: dtype=float32 shape=[2, 3, 1024]" in capsys.readouterr().out


@pytest.mark.parametrize(("shape", "message"), [
    ("image=1x2x32x32", "the model takes image of shape [-1, 1, -1, -1]"),
    ("pixels=1x1x32x32", "--shape names ['pixels'], but the model's inputs are ['image']"),
    ("image=1xAx32", "expected NAME=DIMS such as image=1x3x640x640"),
    ("image", "expected NAME=DIMS"),
])
def test_a_wrong_shape_is_refused_before_any_call(served, capsys, shape, message):
    assert cli.main(["--url", served.url, "infer", "--model", "tiled", "--shape", shape]) == 1
    assert message in capsys.readouterr().err


def test_a_tensorrt_profile_gives_its_opt_shape():
    md = pb.ModelMetadataResponse(
        name="m", max_batch_size=8,
        inputs=[pb.TensorMetadata(name="image", dtype=pb.DATA_TYPE_FP32,
                                  shape=[-1, 3, -1, -1])],
        profiles=[pb.Profile(index=0, inputs=[pb.ShapeRange(
            name="image", min=[1, 3, 32, 32], opt=[4, 3, 640, 480], max=[8, 3, 1280, 1280])])])
    x = cli.random_inputs(md, rows=2)["image"]
    assert x.shape == (2, 3, 640, 480)
    no_profile = pb.ModelMetadataResponse(name="m", max_batch_size=8, inputs=md.inputs)
    assert cli.random_inputs(no_profile, rows=1)["image"].shape == (1, 3, 64, 64)
    chosen = cli.random_inputs(md, rows=2, shapes={"image": [1, 3, 96, 96]})["image"]
    assert chosen.shape == (1, 3, 96, 96)
    assert np.isfinite(chosen).all()
