"""Look inside an engine: load it, list its layers and fusions, describe it for people.

The layers come from the engine inspector where the engine loads (needs a GPU), else
from the builder log. `describe_engine` falls back on the manifest the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtserve.service.backends.tensorrt.api import (
    engine_io,
    gc_paused,
    gpu_present,
    import_tensorrt,
    library_info,
    profile_shapes,
)
from trtserve.service.build.log import _CapturedLog
from trtserve.service.build.manifest import _profile_json, load_manifest, manifest_path
from trtserve.service.build.options import BuildError

if TYPE_CHECKING:
    import types

    import tensorrt as trt


# ---------------------------------------------------------------------------------
# Engine layers and fusions


@dataclass(frozen=True)
class EngineLayer:
    """One layer of the built engine and the ONNX nodes it implements."""

    name: str
    type: str
    onnx_layers: tuple[str, ...]

    @property
    def fused(self) -> bool:
        # TensorRT names fused layers "a + b" (pointwise fusions "PWN(a, b)"); Myelin
        # kernels keep a generated name but list every ONNX node they cover.
        return (
            len(self.onnx_layers) > 1
            or " + " in self.name
            or self.name.startswith("PWN(")
            or "fused" in self.name.lower()
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "onnx_layers": list(self.onnx_layers),
            "fused": self.fused,
        }


_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")
# ONELINE layer information, as the builder logs it at VERBOSE with DETAILED verbosity.
_ONELINE_LAYER = re.compile(r"^Name: (?P<name>.+?), LayerType: (?P<type>[^,]*),")
# TensorRT's "Engine Layer Information" lines: "Layer(CaskConvolution): conv0 + relu0, Tactic: ...".
_ENGINE_LAYER = re.compile(r"^Layer\((?P<type>[^)]*)\): (?P<name>.+?), Tactic: ")


def _logged_layers(log: _CapturedLog) -> list[EngineLayer]:
    layers: dict[str, EngineLayer] = {}
    for _, text in log.split_lines():
        text = text.strip()
        match = _ONELINE_LAYER.match(text) or _ENGINE_LAYER.match(text)
        if match is None or match["name"] in layers:
            continue
        metadata = text.split("Metadata: ", 1)[1] if "Metadata: " in text else ""
        layers[match["name"]] = EngineLayer(
            match["name"], match["type"], tuple(_ONNX_LAYER.findall(metadata))
        )
    return list(layers.values())


# Layers (and log lines) of profile N > 0 carry this mark in their names.
_PROFILE_MARK = re.compile(r" \[profile \d+\]")


def _one_profile(layers: list[EngineLayer], profiles: int) -> list[EngineLayer]:
    """The layers of profile 0.

    An engine holds one copy of its layers per optimization profile, and the builder
    log and the engine inspector list them all, profile by profile: counting them
    all would multiply every count by the number of profiles.
    """
    if profiles <= 1 or not layers:
        return layers
    size, rest = divmod(len(layers), profiles)
    blocks = [layers[i * size : (i + 1) * size] for i in range(profiles)]
    if rest == 0 and all(
        [layer.type for layer in block] == [layer.type for layer in blocks[0]] for block in blocks
    ):
        return blocks[0]
    # Not equal blocks (profiles built differently): drop the layers marked as another
    # profile's, which TensorRT does where a layer keeps its ONNX name.
    return [layer for layer in layers if not _PROFILE_MARK.search(layer.name)]


def _without_profile_marks(messages: list[str]) -> list[str]:
    """Messages the builder repeats for each profile, each once."""
    return list(dict.fromkeys(_PROFILE_MARK.sub("", message) for message in messages))


def _inspector_layers(trt_module: types.ModuleType, engine: trt.ICudaEngine) -> list[EngineLayer]:
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt_module.LayerInformationFormat.JSON))
    layers = []
    for entry in info.get("Layers", []):
        # With LAYER_NAMES_ONLY verbosity an entry is just the name.
        if isinstance(entry, str):
            layers.append(EngineLayer(entry, "", ()))
        else:
            metadata = str(entry.get("Metadata", ""))
            layers.append(
                EngineLayer(
                    str(entry.get("Name", "")),
                    str(entry.get("LayerType", "")),
                    tuple(_ONNX_LAYER.findall(metadata)),
                )
            )
    return layers


# ---------------------------------------------------------------------------------
# Loading an engine, and describing one


@dataclass
class _Deserialized:
    # The runtime must outlive the engine it made, so they travel together.
    runtime: trt.Runtime | None
    engine: trt.ICudaEngine | None
    error: str | None


def _deserialize(trt_module: types.ModuleType, data: bytes | memoryview) -> _Deserialized:
    """Load an engine if this machine can; else say why (TensorRT needs a CUDA device)."""
    log = _CapturedLog(trt_module)
    with gc_paused():
        runtime = trt_module.Runtime(log.logger)
        engine = runtime.deserialize_cuda_engine(data)
    if engine is not None:
        return _Deserialized(runtime, engine, None)
    # The first error says why; later ones repeat it from deeper in the library.
    reason = log.first_error() or "no reason logged"
    if not gpu_present():
        reason = f"this machine has no NVIDIA GPU, which loading an engine needs ({reason})"
    return _Deserialized(None, None, reason)


def describe_engine(engine_path: str | Path) -> str:
    """A human-readable account of an engine: IO tensors, profiles, aux streams, layers.

    Uses the engine itself (engine inspector) where it can be loaded, which needs a GPU;
    otherwise the manifest written when it was built.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f"engine not found: {engine_path}")
    if engine_path.suffix.lower() == ".onnx":
        return describe_onnx(engine_path)
    manifest = load_manifest(engine_path) if manifest_path(engine_path).is_file() else None
    try:
        trt_module = import_tensorrt()
    except RuntimeError as err:
        if manifest is None:
            raise
        return _format_description(engine_path, manifest, f"manifest ({err})")
    loaded = _deserialize(trt_module, engine_path.read_bytes())
    if loaded.engine is None:
        if manifest is None and _is_onnx_model(engine_path):
            return describe_onnx(engine_path)
        if manifest is None:
            raise BuildError(
                f"cannot describe {engine_path}: the engine does not load here "
                f"({loaded.error}) and there is no manifest {manifest_path(engine_path)}"
            )
        return _format_description(
            engine_path,
            manifest,
            f"manifest {manifest_path(engine_path).name} (engine not loaded: {loaded.error})",
        )
    engine = loaded.engine
    name, version = library_info(trt_module)
    live = {
        "library": {"name": name, "version": version},
        "io_tensors": [t.to_json() for t in engine_io(engine)],
        "profiles": [
            _profile_json(i, profile_shapes(engine, i))
            for i in range(engine.num_optimization_profiles)
        ],
        "aux_streams": {
            **(manifest or {}).get("aux_streams", {}),
            "num_aux_streams": engine.num_aux_streams,
        },
        "settings": (manifest or {}).get("settings", {}),
        "timing_cache": (manifest or {}).get("timing_cache"),
        "layers": [
            layer.to_json()
            for layer in _one_profile(
                _inspector_layers(trt_module, engine), engine.num_optimization_profiles
            )
        ],
    }
    return _format_description(engine_path, live, "engine inspector")


def _format_description(engine_path: Path, summary: Mapping[str, Any], source: str) -> str:
    library = summary.get("library", {})
    lines = [
        f"engine       {engine_path} ({engine_path.stat().st_size:,} bytes)",
        f"library      {library.get('name', '?')} {library.get('version', '?')}",
        f"source       {source}",
        "io tensors",
    ]
    for tensor in summary.get("io_tensors", []):
        shape = "x".join(str(d) for d in tensor["shape"])
        lines.append(f"  {tensor['mode']:<7} {tensor['name']:<24} {tensor['dtype']:<8} {shape}")
    profiles = summary.get("profiles", [])
    lines.append(f"profiles     {len(profiles)}")
    for profile in profiles:
        for name, shapes in profile["inputs"].items():
            low, opt, high = ("x".join(map(str, shapes[k])) for k in ("min", "opt", "max"))
            lines.append(f"  #{profile['index']:<3} {name:<24} min {low}  opt {opt}  max {high}")
    aux = summary.get("aux_streams", {})
    count, requested = aux.get("num_aux_streams"), aux.get("max_aux_streams")
    lines.append(
        f"aux streams  {'unknown' if count is None else count} (max_aux_streams requested: "
        f"{'library default' if requested is None else requested})"
    )
    # Why the builder did or did not use more streams (e.g. "[MS] Multi stream is
    # disabled ..."): the reason an engine has fewer aux streams than allowed.
    lines.extend(f"  builder: {message}" for message in aux.get("builder_messages", []))
    settings = summary.get("settings", {})
    for setting, why in settings.get("unavailable", {}).items():
        lines.append(f"not applied  {setting}: {why}")
    cache = summary.get("timing_cache")
    if cache:
        lines.append(f"timing cache {timing_cache_line(cache)}")
    layers = summary.get("layers", [])
    fused = [layer for layer in layers if layer["fused"]]
    per_profile = " per profile" if len(profiles) > 1 else ""
    lines.append(f"layers       {len(layers)}{per_profile}, {len(fused)} fused (*)")
    for layer in layers:
        mark = "*" if layer["fused"] else " "
        covers = f"  <- {' + '.join(layer['onnx_layers'])}" if layer["onnx_layers"] else ""
        kind = f" [{layer['type']}]" if layer["type"] else ""
        lines.append(f"  {mark} {layer['name']}{kind}{covers}")
    return "\n".join(lines)


def timing_cache_line(cache: Mapping[str, Any]) -> str:
    """What happened to the timing cache, in one line (`trtserve build` and `inspect`)."""
    before = cache.get("bytes_before")
    status = cache.get("status", "?")
    if status == "ignored":
        return f"ignored by this library ({cache['path']} neither loaded nor saved)"
    if status == "loaded":
        return f"loaded {before} bytes, saved {cache.get('bytes_after')} ({cache['path']})"
    if status == "rejected":
        return (
            f"rejected ({cache['path']}: made by another library version or GPU), "
            f"new cache saved: {cache.get('bytes_after')} bytes"
        )
    return f"{status}: saved {cache.get('bytes_after')} bytes ({cache['path']})"


def _is_onnx_model(path: Path) -> bool:
    """Whether the file reads as an ONNX model with a graph (whatever its name)."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return False
    # Arbitrary bytes can decode as an empty message: a model has outputs.
    return len(model.graph.output) > 0


def describe_onnx(path: Path) -> str:
    """What `inspect` says of an ONNX model: what it is, its IO, how to build an engine."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as err:
        raise BuildError(
            f"{path} is named like an ONNX model but does not load as one ({err})"
        ) from None
    opsets = model.opset_import
    lines = [
        f"{path} is an ONNX model, not a TensorRT engine: build one with "
        f"`trtserve build {path} -o {path.with_suffix('.engine')}`",
        "opset        " + ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in opsets),
        "io tensors",
    ]
    initializers = {init.name for init in model.graph.initializer}
    for mode, values in (("input", model.graph.input), ("output", model.graph.output)):
        for value in values:
            if value.name in initializers:
                continue
            tensor_type = value.type.tensor_type
            dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
            dims = [
                str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?")
                for d in tensor_type.shape.dim
            ]
            lines.append(f"  {mode:<7} {value.name:<24} {dtype:<8} {'x'.join(dims) or 'scalar'}")
    return "\n".join(lines)
