"""Real engine builds from generated ONNX models: no GPU needed (tensorrt-rtx builds on the CPU).

Each build of these tiny models takes a fraction of a second. Engines that can be
loaded here (a GPU is present) are also checked directly; elsewhere those checks skip.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("tensorrt_rtx") is None:
    pytest.importorskip("tensorrt", reason="neither tensorrt nor tensorrt_rtx is installed")

from trtserve.service.backends.tensorrt.api import (
    import_tensorrt,
    library_info,
    numpy_dtype,
    profile_shapes,
    trt_dtype,
)
from trtserve.service.build import cli as build_cli
from trtserve.service.build.build import (
    BuildError,
    BuildOptions,
    DynamicShapeError,
    OptionError,
    build_engine,
    default_batch_opt,
    describe_engine,
    load_manifest,
    manifest_path,
)
from trtserve.service.testing import onnx_models


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    onnx_models.mlp(folder / "mlp.onnx")
    onnx_models.conv_net(folder / "conv.onnx")
    onnx_models.conv_net(folder / "conv_dynamic.onnx", dynamic_spatial=True)
    return folder


@pytest.fixture(scope="module")
def mlp_build(models: Path) -> tuple[Path, dict[str, Any]]:
    engine = models / "mlp.engine"
    options = BuildOptions(profiles=2, batch=(1, 32, 64), max_aux_streams=2)
    return engine, build_engine(models / "mlp.onnx", engine, options)


@pytest.fixture(scope="module")
def conv_build(models: Path) -> tuple[Path, dict[str, Any]]:
    engine = models / "conv.engine"
    return engine, build_engine(models / "conv.onnx", engine, BuildOptions(batch=(1, 8, 16)))


def _load_engine(engine_path: Path) -> Any:
    """The engine, or skip: loading needs a GPU the library supports."""
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        pytest.skip("the engine cannot be loaded on this machine (needs a supported GPU)")
    return runtime, engine


# --- the manifest of a real build ----------------------------------------------------


def test_engine_and_manifest_are_written(mlp_build: tuple[Path, dict[str, Any]]) -> None:
    engine, manifest = mlp_build
    assert engine.stat().st_size == manifest["engine_bytes"] > 0
    assert manifest_path(engine) == engine.with_name("mlp.engine.json")
    assert load_manifest(engine) == json.loads(json.dumps(manifest))


def test_manifest_names_the_library(mlp_build: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = mlp_build
    name, version = library_info()
    assert manifest["library"] == {"name": name, "version": version}
    assert name in ("tensorrt", "tensorrt_rtx") and version[0].isdigit()


def test_manifest_io_tensors(mlp_build: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = mlp_build
    assert manifest["io_tensors"] == [
        {"name": "input", "mode": "input", "dtype": "float32", "shape": [-1, 32]},
        {"name": "output", "mode": "output", "dtype": "float32", "shape": [-1, 8]},
    ]


def test_manifest_profiles(mlp_build: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = mlp_build
    assert [p["index"] for p in manifest["profiles"]] == [0, 1]
    for profile in manifest["profiles"]:
        assert profile["inputs"] == {"input": {"min": [1, 32], "opt": [32, 32], "max": [64, 32]}}


def test_manifest_aux_streams(mlp_build: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = mlp_build
    aux = manifest["aux_streams"]
    assert aux["max_aux_streams"] == 2
    assert manifest["settings"]["applied"]["max_aux_streams"] == 2
    if manifest["deserialized"]:
        assert 0 <= aux["num_aux_streams"] <= 2
    else:
        # Without a GPU the engine does not load, so its count is unknown: say why.
        assert aux["num_aux_streams"] is None
        assert manifest["deserialize_error"]


def test_manifest_keeps_the_builder_log(mlp_build: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = mlp_build
    log = manifest["builder_log"]
    assert log and all(line.split(":")[0] in ("INFO", "WARNING", "ERROR") for line in log)
    assert manifest["build_seconds"] > 0


def test_built_engine_has_the_profiles(mlp_build: tuple[Path, dict[str, Any]]) -> None:
    engine_path, manifest = mlp_build
    _runtime, engine = _load_engine(engine_path)
    assert engine.num_optimization_profiles == 2
    for index in range(2):
        assert profile_shapes(engine, index) == {"input": ((1, 32), (32, 32), (64, 32))}
    assert engine.num_aux_streams == manifest["aux_streams"]["num_aux_streams"]


def test_conv_net_reports_fused_layers(conv_build: tuple[Path, dict[str, Any]]) -> None:
    _, manifest = conv_build
    fused = manifest["fused_layers"]
    assert fused, manifest["layers"]
    assert all(layer["fused"] for layer in fused)
    # Each Conv is fused with the Relu after it (the bias folds into the Conv).
    covered = [set(layer["onnx_layers"]) for layer in fused] + [
        {part.strip() for part in layer["name"].split("+")} for layer in fused
    ]
    assert any({"conv0", "relu0"} <= names for names in covered), fused


def test_describe_engine(conv_build: tuple[Path, dict[str, Any]]) -> None:
    engine, _ = conv_build
    text = describe_engine(engine)
    assert "image" in text and "logits" in text
    assert "min 1x3x16x16  opt 8x3x16x16  max 16x3x16x16" in text
    assert "aux streams" in text
    assert "fused (*)" in text and "\n  * " in text


def test_shape_ranges_for_other_dynamic_dims(models: Path) -> None:
    shapes = {"image": ((1, 3, 8, 8), (4, 3, 16, 16), (8, 3, 32, 32))}
    manifest = build_engine(
        models / "conv_dynamic.onnx",
        models / "conv_dynamic.engine",
        BuildOptions(batch=(1, 4, 8), shapes=shapes),
    )
    assert manifest["io_tensors"][0]["shape"] == [-1, 3, -1, -1]
    assert manifest["profiles"][0]["inputs"]["image"] == {
        "min": [1, 3, 8, 8],
        "opt": [4, 3, 16, 16],
        "max": [8, 3, 32, 32],
    }


# --- timing cache ----------------------------------------------------------------------


def _library_uses_timing_caches() -> bool:
    # tensorrt_rtx keeps the timing-cache calls but says they are no-ops.
    return library_info()[0] != "tensorrt_rtx"


def test_timing_cache_is_written_then_loaded(models: Path, tmp_path: Path) -> None:
    if not _library_uses_timing_caches():
        pytest.skip(f"{library_info()[0]} does not use timing caches")
    cache = tmp_path / "model.timing-cache"
    options = BuildOptions(batch=(1, 8, 16), timing_cache=cache)

    first = build_engine(models / "mlp.onnx", tmp_path / "a.engine", options)["timing_cache"]
    assert first["status"] == "created" and first["bytes_before"] is None
    assert cache.is_file() and first["bytes_after"] == cache.stat().st_size > 0

    second = build_engine(models / "mlp.onnx", tmp_path / "b.engine", options)["timing_cache"]
    assert second["status"] == "loaded" and second["saved"]
    assert second["bytes_before"] == first["bytes_after"]
    assert second["bytes_after"] == cache.stat().st_size


def test_a_library_that_ignores_timing_caches_says_so(models: Path, tmp_path: Path) -> None:
    """tensorrt_rtx: never "hit", never a file written for a cache nothing used."""
    if _library_uses_timing_caches():
        pytest.skip(f"{library_info()[0]} uses timing caches")
    cache = tmp_path / "model.timing-cache"
    options = BuildOptions(batch=(1, 8, 16), timing_cache=cache)
    first = build_engine(models / "mlp.onnx", tmp_path / "a.engine", options)["timing_cache"]
    assert first["status"] == "ignored" and first["saved"] is False
    assert "no-op" in " ".join(first["library_notes"]).lower()
    assert not cache.exists()
    # A cache another model's build left there is neither loaded nor touched.
    cache.write_bytes(b"another model's timing cache")
    conv_options = BuildOptions(batch=(1, 8, 16), timing_cache=cache)
    second = build_engine(models / "conv.onnx", tmp_path / "c.engine", conv_options)
    assert second["timing_cache"]["status"] == "ignored"
    assert cache.read_bytes() == b"another model's timing cache"


# --- what the build refuses ---------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field", "received"),
    [
        ({"profiles": 0}, "profiles", "0"),
        ({"profiles": True}, "profiles", "True"),
        ({"batch": (4, 2, 8)}, "batch", "(4, 2, 8)"),
        ({"batch": (0, 1, 2)}, "batch", "(0, 1, 2)"),
        ({"batch": (1, 2)}, "batch", "(1, 2)"),
        ({"max_aux_streams": -1}, "max_aux_streams", "-1"),
        ({"builder_optimization_level": 6}, "builder_optimization_level", "6"),
        ({"avg_timing_iterations": 0}, "avg_timing_iterations", "0"),
        ({"mps_percentage": 101}, "mps_percentage", "101"),
        ({"workspace_mib": 0}, "workspace_mib", "0"),
        ({"fp16": "yes"}, "fp16", "'yes'"),
        ({"fp16": True, "strongly_typed": True}, "strongly_typed", "fp16=True"),
        ({"shapes": {"x": ((1, 2), (1, 2), (1,))}}, "shapes['x']", "(1,)"),
        ({"shapes": {"x": ((1, 4), (1, 2), (1, 3))}}, "shapes['x']", "(1, 4)"),
        ({"shapes": {"x": ((0, 2), (1, 2), (1, 2))}}, "shapes['x']", "(0, 2)"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], field: str, received: str) -> None:
    with pytest.raises(OptionError) as caught:
        BuildOptions(**options)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ") and received in str(caught.value)


@pytest.mark.parametrize(
    ("low", "high", "opt"), [(1, 64, 64), (1, 100, 96), (1, 31, 31), (33, 63, 63), (1, 32, 32)]
)
def test_default_batch_opt_prefers_multiples_of_32(low: int, high: int, opt: int) -> None:
    assert default_batch_opt(low, high) == opt


def _unknown_op_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"], name="mystery")],
        "unknown_op",
        [tensor("x", TensorProto.FLOAT, [1, 4])],
        [tensor("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("truncated", "Failed to parse the ONNX model"),
        ("text", "defines no graph outputs"),
        ("unknown op", r"node 0 'mystery' \(NoSuchOp\): .+"),
    ],
)
def test_broken_onnx_gives_a_clear_error(
    models: Path, tmp_path: Path, content: str, reason: str
) -> None:
    broken = tmp_path / "broken.onnx"
    if content == "truncated":
        whole = (models / "conv.onnx").read_bytes()
        broken.write_bytes(whole[: len(whole) // 2])
    elif content == "text":
        # Arbitrary bytes may decode as an empty protobuf message and "parse".
        broken.write_bytes(b"this is not an ONNX model")
    else:
        _unknown_op_model(broken)
    with pytest.raises(BuildError, match=rf"could not parse ONNX model .*broken\.onnx: .*{reason}"):
        build_engine(broken, tmp_path / "broken.engine", BuildOptions(batch=(1, 1, 1)))
    assert not (tmp_path / "broken.engine").exists()


def test_missing_onnx_file(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="ONNX model not found"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "absent.engine")


def test_dynamic_batch_needs_a_range(models: Path, tmp_path: Path) -> None:
    with pytest.raises(DynamicShapeError, match=r"input 'input' .* dynamic dimension\(s\) \[0\]"):
        build_engine(models / "mlp.onnx", tmp_path / "x.engine", BuildOptions())


def test_shapes_must_name_inputs(models: Path, tmp_path: Path) -> None:
    shapes = {"nope": ((1, 32), (1, 32), (1, 32))}
    with pytest.raises(BuildError, match=r"\['nope'\], which are not inputs .*\['input'\]"):
        build_engine(models / "mlp.onnx", tmp_path / "x.engine", BuildOptions(shapes=shapes))


def test_shapes_must_keep_static_dims(models: Path, tmp_path: Path) -> None:
    shapes = {"input": ((1, 16), (2, 16), (4, 16))}
    with pytest.raises(BuildError, match=r"dimension 1 .* fixes it at 32"):
        build_engine(models / "mlp.onnx", tmp_path / "x.engine", BuildOptions(shapes=shapes))


def test_mps_without_a_daemon_is_refused(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-mps-here"))
    options = BuildOptions(batch=(1, 1, 1), mps_percentage=50)
    with pytest.raises(BuildError, match=r"needs an NVIDIA GPU|no MPS control daemon"):
        build_engine(models / "mlp.onnx", tmp_path / "x.engine", options)
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in os.environ


def _library_has_fp16_flag() -> bool:
    return hasattr(import_tensorrt().BuilderFlag, "FP16")


def test_unavailable_precision_is_an_error(models: Path, tmp_path: Path) -> None:
    engine = tmp_path / "fp16.engine"
    options = BuildOptions(batch=(1, 1, 1), fp16=True)
    if _library_has_fp16_flag():
        assert build_engine(models / "mlp.onnx", engine, options)["settings"]["applied"]["fp16"]
        return
    with pytest.raises(BuildError, match=r"fp16 was asked for but cannot be applied: .*"
                       r"--allow-precision-fallback"):
        build_engine(models / "mlp.onnx", engine, options)
    assert not engine.exists()


def test_precision_fallback_when_allowed_is_reported(models: Path, tmp_path: Path) -> None:
    if _library_has_fp16_flag():
        pytest.skip("the library applies fp16: nothing falls back")
    options = BuildOptions(batch=(1, 1, 1), fp16=True, allow_precision_fallback=True)
    manifest = build_engine(models / "mlp.onnx", tmp_path / "fp16.engine", options)
    settings = manifest["settings"]
    assert "fp16" not in settings["applied"]
    assert "no BuilderFlag.FP16" in settings["unavailable"]["fp16"]
    assert manifest["options"]["allow_precision_fallback"] is True


def test_strongly_typed_and_builder_settings_are_applied(models: Path, tmp_path: Path) -> None:
    options = BuildOptions(
        batch=(1, 1, 1),
        strongly_typed=True,
        builder_optimization_level=1,
        avg_timing_iterations=2,
        workspace_mib=64,
    )
    manifest = build_engine(models / "mlp.onnx", tmp_path / "typed.engine", options)
    settings = manifest["settings"]
    for name, value in [
        ("strongly_typed", True),
        ("builder_optimization_level", 1),
        ("avg_timing_iterations", 2),
        ("workspace_mib", 64),
    ]:
        assert settings["applied"].get(name) == value or name in settings["unavailable"]


# --- trt_api ---------------------------------------------------------------------------


def test_import_tensorrt_finds_the_library_not_the_stubs() -> None:
    # tensorrt-stubs makes `import tensorrt` succeed with an empty namespace package.
    module = import_tensorrt()
    assert hasattr(module, "Builder") and module.__name__ in ("tensorrt", "tensorrt_rtx")


# --- dtype helpers ---------------------------------------------------------------------


def test_dtype_round_trip() -> None:
    import numpy as np

    for dtype in (np.float32, np.float16, np.int8, np.uint8, np.int32, np.int64, np.bool_):
        assert numpy_dtype(trt_dtype(dtype)) == np.dtype(dtype)
    # numpy has no bfloat16: BF16 travels as raw uint16 bit patterns.
    assert trt_dtype(np.uint16).name == "BF16"
    with pytest.raises(TypeError, match="float64"):
        trt_dtype(np.float64)


# --- the CLI ---------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="trtserve")
    build_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_build_and_inspect(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = tmp_path / "conv.engine"
    cache = tmp_path / "conv.timing-cache"
    argv = ["build", str(models / "conv.onnx"), "-o", str(engine), "--profiles", "2"]
    argv += ["--batch", "1:64", "--max-aux-streams", "1", "--timing-cache", str(cache)]
    assert _cli(*argv) == 0
    out = capsys.readouterr().out
    assert "profiles       2" in out and "opt 64x3x16x16" in out and "fused layers" in out
    first = "created: saved" if _library_uses_timing_caches() else "ignored by this library"
    assert f"timing cache   {first}" in out
    assert _cli(*argv) == 0
    second = "loaded" if _library_uses_timing_caches() else "ignored by this library"
    assert f"timing cache   {second}" in capsys.readouterr().out
    assert _cli("inspect", str(engine)) == 0
    assert "profiles     2" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--batch", "4:2:8"], "--batch"),
        (["--batch", "a:b"], "--batch"),
        (["--shape", "image=1x3:2"], "--shape"),
        (["--shape", "image=1x3x4x4:1x3x4x4:1x3x4x3"], "--shape"),
        (["--profiles", "0"], "--profiles"),
        (["--builder-optimization-level", "9"], "--builder-optimization-level"),
        (["--fp16", "--strongly-typed"], "--strongly-typed"),
    ],
)
def test_cli_bad_flags_name_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        _cli("build", "m.onnx", "-o", "m.engine", *argv)
    assert caught.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_cli_build_error_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _cli("build", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "x.engine")) == 1
    assert "ONNX model not found" in capsys.readouterr().err


# --- issue 19, section 4: building from real models -----------------------------------


def test_fused_layers_are_counted_once_whatever_the_profile_count(models: Path) -> None:
    """Each profile has its own copy of every layer; the log lists them all."""
    counts = {}
    for profiles in (1, 4):
        manifest = build_engine(
            models / "conv.onnx",
            models / f"conv_p{profiles}.engine",
            BuildOptions(profiles=profiles, batch=(1, 8, 16)),
        )
        counts[profiles] = (len(manifest["layers"]), len(manifest["fused_layers"]))
        assert not any("[profile" in layer["name"] for layer in manifest["layers"])
    assert counts[1][1] > 0
    assert counts[4] == counts[1]


@pytest.fixture(scope="module")
def aux_build(models: Path) -> tuple[Path, dict[str, Any]]:
    engine = models / "conv_aux.engine"
    options = BuildOptions(profiles=2, batch=(1, 8, 16), max_aux_streams=2)
    return engine, build_engine(models / "conv.onnx", engine, options)


def test_inspect_shows_why_multi_stream_is_off(aux_build: tuple[Path, dict[str, Any]]) -> None:
    engine, manifest = aux_build
    messages = manifest["aux_streams"]["builder_messages"]
    # The builder says for each profile that it disabled multi-stream; the manifest once.
    assert any("Multi stream is disabled" in m for m in messages), messages
    assert len(messages) == len(set(messages))
    text = describe_engine(engine)
    for message in messages:
        assert text.count(message) == 1, text


def test_inspect_on_an_onnx_model_says_so(
    models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("inspect", str(models / "conv_dynamic.onnx")) == 0
    out = capsys.readouterr().out
    assert "is an ONNX model, not a TensorRT engine" in out and "trtserve build" in out
    assert "input   image                    float    batchx3xheightxwidth" in out
    assert "output  logits                   float    batchx10" in out
    # Named like an engine, it is still recognised, not a traceback.
    disguised = models / "conv_dynamic_onnx.engine"
    disguised.write_bytes((models / "conv_dynamic.onnx").read_bytes())
    assert _cli("inspect", str(disguised)) == 0
    assert "is an ONNX model, not a TensorRT engine" in capsys.readouterr().out


def test_cli_build_without_a_batch_names_the_flags(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("build", str(models / "mlp.onnx"), "-o", str(tmp_path / "x.engine")) == 1
    err = capsys.readouterr().err
    assert "pass --shape input=MIN:OPT:MAX" in err and "or --batch MIN:OPT:MAX" in err


def test_cli_fp16_that_cannot_be_applied_fails_unless_allowed(
    models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if _library_has_fp16_flag():
        pytest.skip("the library applies fp16")
    argv = ["build", str(models / "mlp.onnx"), "-o", str(tmp_path / "x.engine"), "--batch", "1:8"]
    assert _cli(*argv, "--fp16") == 1
    assert "fp16 was asked for but cannot be applied" in capsys.readouterr().err
    assert not (tmp_path / "x.engine").exists()
    assert _cli(*argv, "--fp16", "--allow-precision-fallback") == 0
    assert "not applied    fp16: " in capsys.readouterr().out


# Non-square ranges: height and width differ in every one of min, opt and max.
_NON_SQUARE = ((1, 3, 8, 16), (2, 3, 16, 24), (4, 3, 32, 48))


def test_dims_named_question_mark_are_not_taken_as_equal(models: Path, tmp_path: Path) -> None:
    """Exporters name unknown dims "?"; TensorRT would build [N, 3, ?, ?] square only."""
    model = onnx_models.conv_net(
        tmp_path / "q.onnx", dynamic_spatial=True, spatial_names=("?", "?")
    )
    options = BuildOptions(shapes={"image": _NON_SQUARE})
    manifest = build_engine(model, tmp_path / "q.engine", options)
    assert manifest["profiles"][0]["inputs"]["image"]["opt"] == [2, 3, 16, 24]
    assert manifest["settings"]["applied"]["unnamed_dimensions"] == ["image[2]", "image[3]"]


def test_dims_sharing_a_real_name_must_be_equal_and_the_error_says_so(tmp_path: Path) -> None:
    model = onnx_models.conv_net(
        tmp_path / "side.onnx", dynamic_spatial=True, spatial_names=("side", "side")
    )
    with pytest.raises(
        BuildError,
        match=r"'image' dimension 2, 'image' dimension 3 share the name 'side'.*equal.*"
        r"the min shapes give them \[8, 16\].*distinct names",
    ):
        build_engine(model, tmp_path / "side.engine", BuildOptions(shapes={"image": _NON_SQUARE}))
    square = ((1, 3, 8, 8), (2, 3, 16, 16), (4, 3, 32, 32))
    build_engine(model, tmp_path / "side.engine", BuildOptions(shapes={"image": square}))
