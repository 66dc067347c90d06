"""`trtserve serve --backend tensorrt` on an .onnx model: the build it runs first.

The serve flags and `[models.build]` keys take the same build options as
`trtserve build` (service/build/settings.py). Real builds of generated models with
whichever TensorRT library is installed (tensorrt_rtx builds without a GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("tensorrt_rtx") is None:
    pytest.importorskip("tensorrt", reason="neither tensorrt nor tensorrt_rtx is installed")

from trtserve.service import cli
from trtserve.service.backends.tensorrt.load import EngineLoadError
from trtserve.service.build import serving
from trtserve.service.build.build import load_manifest
from trtserve.service.config import ModelConfig, ServerConfig, load_toml
from trtserve.service.errors import ConfigError
from trtserve.service.example_model import write_example
from trtserve.service.testing import onnx_models

IMAGE_RANGE = "image=1x3x8x8:2x3x16x16:4x3x32x32"


@pytest.fixture
def conv_dynamic(tmp_path: Path) -> Path:
    return onnx_models.conv_net(tmp_path / "conv_dynamic.onnx", dynamic_spatial=True)


def _serve_config(*argv: str) -> ServerConfig:
    parser = argparse.ArgumentParser(prog="trtserve")
    cli.add_serve(parser.add_subparsers(dest="command", required=True))
    return cli.build_config(parser.parse_args(["serve", *argv]))


def test_the_example_model_builds_with_no_build_settings(tmp_path: Path) -> None:
    """Only the batch is dynamic: serve picks 1:OPT:max_batch_size (64 when unset)."""
    model = write_example(tmp_path / "example.onnx")
    engine = serving.engine_for(ModelConfig(name="m", path=str(model), backend="tensorrt"))
    profile = load_manifest(engine)["profiles"][0]["inputs"]["input"]
    assert profile == {"min": [1, 64], "opt": [64, 64], "max": [64, 64]}


def test_models_build_shapes_in_a_config_file(tmp_path: Path, conv_dynamic: Path) -> None:
    config_file = tmp_path / "trtserve.toml"
    config_file.write_text(
        f'[[models]]\nname = "conv"\npath = "{conv_dynamic}"\nbackend = "tensorrt"\n'
        f'[models.build]\nshapes = ["{IMAGE_RANGE}"]\nprofiles = 2\n'
    )
    (model,) = load_toml(config_file).models
    assert model.build.shapes == (IMAGE_RANGE,)
    manifest = load_manifest(serving.engine_for(model))
    assert len(manifest["profiles"]) == 2
    assert manifest["profiles"][1]["inputs"]["image"] == {
        "min": [1, 3, 8, 8], "opt": [2, 3, 16, 16], "max": [4, 3, 32, 32]
    }


def test_serve_takes_the_build_flags_of_trtserve_build(conv_dynamic: Path) -> None:
    config = _serve_config(
        "--model", f"conv={conv_dynamic}", "--backend", "tensorrt", "--shape", IMAGE_RANGE,
        "--profiles", "2", "--max-aux-streams", "1", "--workspace-mib", "64",
    )
    (model,) = config.models
    options = load_manifest(serving.engine_for(model))["options"]
    assert options["profiles"] == 2 and options["max_aux_streams"] == 1
    assert options["workspace_mib"] == 64 and options["batch"] == [1, 2, 4]
    assert options["shapes"] == {"image": [[1, 3, 8, 8], [2, 3, 16, 16], [4, 3, 32, 32]]}


def test_serve_flags_override_the_config_file(tmp_path: Path, conv_dynamic: Path) -> None:
    config_file = tmp_path / "trtserve.toml"
    config_file.write_text(
        f'[[models]]\nname = "conv"\npath = "{conv_dynamic}"\n'
        '[models.build]\nprofiles = 3\nbatch = "1:8"\n'
    )
    (model,) = _serve_config("--config", str(config_file), "--profiles", "2").models
    assert model.build.profiles == 2 and model.build.batch == "1:8"


def test_a_missing_range_names_what_serve_takes(conv_dynamic: Path) -> None:
    model = ModelConfig(name="conv", path=str(conv_dynamic), backend="tensorrt")
    with pytest.raises(EngineLoadError) as caught:
        serving.engine_for(model)
    message = str(caught.value)
    assert message.startswith("model 'conv': input 'image' has shape [-1, 3, -1, -1]")
    assert "pass --shape image=MIN:OPT:MAX" in message
    assert '[models.build] shapes = ["image=MIN:OPT:MAX"]' in message


@pytest.mark.parametrize(
    ("key", "value", "received"),
    [
        ("shapes", '["image=1x3"]', "'image=1x3'"),
        ("shapes", f'["{IMAGE_RANGE}", "{IMAGE_RANGE}"]', "'image' given more than once"),
        ("batch", '"4:2:8"', "(4, 2, 8)"),
        ("profiles", "0", "got 0"),
        ("allow_precision_fallback", '"yes"', "'yes'"),
    ],
)
def test_bad_build_keys_name_the_key(tmp_path: Path, key: str, value: str, received: str) -> None:
    config_file = tmp_path / "trtserve.toml"
    config_file.write_text(
        f'[[models]]\nname = "m"\npath = "m.onnx"\n[models.build]\n{key} = {value}\n'
    )
    with pytest.raises(ConfigError, match=rf"build\.{key}: ") as caught:
        load_toml(config_file)
    assert received in str(caught.value)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--batch", "4:2:8"], "--batch"),
        (["--batch", "a:b"], "--batch"),
        (["--shape", "image=1x3:2"], "--shape"),
        (["--shape", "image=1x3x4x4:1x3x4x4:1x3x4x3"], "--shape"),
        (["--profiles", "x"], "--profiles"),
    ],
)
def test_bad_serve_build_flags_name_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        _serve_config("--model", "m=m.onnx", *argv)
    assert caught.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err
