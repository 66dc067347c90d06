"""Build TensorRT engines from ONNX models, and describe what was built.

`build_engine` parses an ONNX model, adds one optimization profile per worker (all
covering the same batch range and shapes), applies the build options the installed
library offers, builds, and writes two files: the serialized engine and a JSON
manifest next to it (`model.engine` -> `model.engine.json`) recording what was asked,
what was applied, the IO tensors, the profiles, aux streams, timing-cache use, the
layers TensorRT fused and the builder log.

Works with `tensorrt` and `tensorrt_rtx`. TensorRT-RTX builds on a machine without a
GPU, but its engines can be loaded (deserialized) only on a GPU; the manifest says
what could not be checked and why.

Options live in `options`, the manifest's path and reading in `manifest`,
loading and describing an engine in `inspect`, the captured builder log in `log`
and the MPS check in `mps` (all in this package). The names importers use are
re-exported here.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trtserve.service.backends.tensorrt.api import (
    IOTensor,
    engine_io,
    gc_paused,
    import_tensorrt,
    library_info,
    network_io,
    profile_shapes,
)
from trtserve.service.build.inspect import (
    _deserialize,
    _Deserialized,
    _inspector_layers,
    _logged_layers,
    _one_profile,
    _without_profile_marks,
    describe_engine,
)
from trtserve.service.build.log import _CapturedLog
from trtserve.service.build.manifest import (
    MANIFEST_VERSION,
    _profile_json,
    load_manifest,
    manifest_path,
)
from trtserve.service.build.mps import _mps_thread_percentage
from trtserve.service.build.options import (
    BuildError,
    BuildOptions,
    DynamicShapeError,
    OptionError,
    ShapeRange,
    default_batch_opt,
)

if TYPE_CHECKING:
    import types

    import tensorrt as trt

__all__ = [
    "BuildError",
    "BuildOptions",
    "DynamicShapeError",
    "OptionError",
    "ShapeRange",
    "build_engine",
    "default_batch_opt",
    "describe_engine",
    "load_manifest",
    "manifest_path",
]


# ---------------------------------------------------------------------------------
# Build


def build_engine(
    onnx_path: str | Path, engine_path: str | Path, options: BuildOptions | None = None
) -> dict[str, Any]:
    """Build `onnx_path` into `engine_path`, write the manifest next to it and return it.

    Raises BuildError when the model cannot be parsed, its dynamic dimensions are not
    all covered by `options`, MPS was asked for but no daemon answers, or the build fails.

    With `mps_percentage`, CUDA_MPS_ACTIVE_THREAD_PERCENTAGE is set for the build. CUDA
    reads it when the process creates its context, so it takes effect only if this
    process has not used CUDA before (true for `trtserve build`).
    """
    options = options or BuildOptions()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise BuildError(f"ONNX model not found: {onnx_path}")
    trt_module = import_tensorrt()
    started = time.perf_counter()
    built = _build(trt_module, onnx_path, options)
    _write_atomically(engine_path, built.engine_data)
    # Loading the engine gives its real profiles and aux-stream count, but needs a GPU.
    loaded = _deserialize(trt_module, built.engine_data)
    manifest = _manifest(trt_module, onnx_path, engine_path, options, built, loaded)
    manifest["total_seconds"] = round(time.perf_counter() - started, 3)
    _write_atomically(manifest_path(engine_path), json.dumps(manifest, indent=2).encode())
    return manifest


@dataclass
class _Built:
    """A serialized engine and what the build learned on the way."""

    engine_data: memoryview
    io_tensors: list[IOTensor]
    ranges: dict[str, ShapeRange]
    settings: _Settings
    log: _CapturedLog
    build_seconds: float
    timing_cache: dict[str, Any] | None
    library_warnings: list[str]


def _build(trt_module: types.ModuleType, onnx_path: Path, options: BuildOptions) -> _Built:
    log = _CapturedLog(trt_module)
    settings = _Settings()
    # Libraries flag deprecated calls with Python warnings (tensorrt_rtx: the timing
    # cache); they are recorded in the manifest rather than printed mid-build.
    with (
        _mps_thread_percentage(options.mps_percentage),
        warnings.catch_warnings(record=True) as caught,
        gc_paused(),
    ):
        warnings.simplefilter("always")
        builder = trt_module.Builder(log.logger)
        # The parser owns weights the network points into: it lives as long as the network.
        network, _parser = _parse_onnx(trt_module, builder, onnx_path, options, settings, log)
        io_tensors = network_io(network)
        ranges = _input_ranges(io_tensors, options)
        _check_dimension_names(network, ranges)
        dynamic = {t.name for t in io_tensors if t.mode == "input" and -1 in t.shape}
        config = builder.create_builder_config()
        # DETAILED makes the builder log each engine layer with the ONNX nodes it
        # covers, which is how fusions are found without a GPU.
        config.profiling_verbosity = trt_module.ProfilingVerbosity.DETAILED
        # Identical profiles, one per worker: each execution context binds its own.
        for _ in range(options.profiles):
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in ranges.items():
                if name in dynamic:
                    profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        _apply_settings(trt_module, config, options, settings)
        cache = _load_timing_cache(config, options.timing_cache) if options.timing_cache else None
        build_started = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_seconds = time.perf_counter() - build_started
        if serialized is None:
            raise BuildError(
                f"TensorRT could not build {onnx_path}: {log.errors() or 'no reason logged'}"
            )
        library_warnings = sorted({str(w.message) for w in caught})
        cache_report = (
            _finish_timing_cache(trt_module, config, cache, library_warnings, log)
            if cache
            else None
        )
    return _Built(
        memoryview(serialized),
        io_tensors,
        ranges,
        settings,
        log,
        build_seconds,
        cache_report,
        library_warnings,
    )


def _manifest(
    trt_module: types.ModuleType,
    onnx_path: Path,
    engine_path: Path,
    options: BuildOptions,
    built: _Built,
    loaded: _Deserialized,
) -> dict[str, Any]:
    engine = loaded.engine
    if engine is not None:
        io_tensors = engine_io(engine)
        profiles = [profile_shapes(engine, i) for i in range(engine.num_optimization_profiles)]
        layers = _inspector_layers(trt_module, engine) or _logged_layers(built.log)
        layers = _one_profile(layers, engine.num_optimization_profiles)
    else:
        # What was asked for; the library builds exactly these or fails.
        io_tensors = built.io_tensors
        profiles = [dict(built.ranges) for _ in range(options.profiles)]
        layers = _one_profile(_logged_layers(built.log), options.profiles)
    name, version = library_info(trt_module)
    return {
        "manifest_version": MANIFEST_VERSION,
        "engine": engine_path.name,
        "engine_bytes": built.engine_data.nbytes,
        "onnx": str(onnx_path),
        "library": {"name": name, "version": version},
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "build_seconds": round(built.build_seconds, 3),
        "options": options.to_json(),
        "settings": {"applied": built.settings.applied, "unavailable": built.settings.unavailable},
        "deserialized": engine is not None,
        "deserialize_error": loaded.error,
        "io_tensors": [t.to_json() for t in io_tensors],
        "profiles": [_profile_json(i, shapes) for i, shapes in enumerate(profiles)],
        "aux_streams": {
            "max_aux_streams": options.max_aux_streams,
            "num_aux_streams": engine.num_aux_streams if engine is not None else None,
            "note": None
            if engine is not None
            else "known once the engine is loaded, which failed here (see deserialize_error)",
            # The builder says why it did or did not use more streams ("[MS] ..."),
            # once per profile.
            "builder_messages": _without_profile_marks(built.log.matching("[MS]")),
        },
        "timing_cache": built.timing_cache,
        "mps": None
        if options.mps_percentage is None
        else {
            "active_thread_percentage": options.mps_percentage,
            "note": "applies only if the building process had not used CUDA before",
        },
        # Each profile has its own copy of every layer; one copy is listed.
        "layers_listed": f"profile 0 of {len(profiles)} (each profile has a copy)",
        "layers": [layer.to_json() for layer in layers],
        "fused_layers": [layer.to_json() for layer in layers if layer.fused],
        "fusion_log": _without_profile_marks(built.log.matching("Fusing ")),
        "library_warnings": built.library_warnings,
        "builder_log": built.log.trimmed(),
    }


@dataclass
class _Settings:
    """What the build applied, and what the installed library could not do (with why)."""

    applied: dict[str, object] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def _parse_onnx(
    trt_module: types.ModuleType,
    builder: trt.Builder,
    onnx_path: Path,
    options: BuildOptions,
    settings: _Settings,
    log: _CapturedLog,
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    flags = 0
    if options.strongly_typed:
        # Strong typing is chosen when the network is created, before parsing.
        flag = getattr(trt_module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if flag is None:
            settings.unavailable["strongly_typed"] = _missing(
                trt_module, "NetworkDefinitionCreationFlag.STRONGLY_TYPED"
            )
        else:
            flags |= 1 << int(flag)
            settings.applied["strongly_typed"] = True
    network = builder.create_network(flags)
    parser = trt_module.OnnxParser(network, log.logger)
    rewritten, unnamed = _without_unknown_dimension_names(onnx_path)
    if unnamed:
        settings.applied["unnamed_dimensions"] = unnamed
    parsed = (
        parser.parse_from_file(str(onnx_path))
        if rewritten is None
        # The path lets the parser find weights stored outside the model file.
        else parser.parse(rewritten, str(onnx_path))
    )
    if not parsed:
        problems = []
        for index in range(parser.num_errors):
            error = parser.get_error(index)
            where = (
                f"node {error.node()} {error.node_name()!r} ({error.node_operator()}): "
                if error.node() >= 0
                else ""
            )
            problems.append(f"{where}{error.desc()}")
        raise BuildError(
            f"could not parse ONNX model {onnx_path}: " + ("; ".join(problems) or log.errors())
        )
    if network.num_outputs == 0:
        # Arbitrary bytes can decode as an empty protobuf message, which parses "fine".
        raise BuildError(
            f"could not parse ONNX model {onnx_path}: it defines no graph outputs "
            "(not an ONNX model, or an empty graph)"
        )
    return network, parser


# Exporters write "?" for a dimension they know nothing about, not as a name.
_UNKNOWN_DIMENSION_NAMES = frozenset({"?"})


def _without_unknown_dimension_names(onnx_path: Path) -> tuple[bytes | None, list[str]]:
    """The model with input dimensions named "?" left unnamed, and which they were.

    TensorRT's parser names each input dimension after its ONNX dim_param, and takes
    dimensions with one name to be equal: an image input [N, 3, ?, ?] could then only
    be square ("contradictory IOptimizationProfile" / "Dimensions with name ? must be
    equal" at build time). The names must go before parsing: renaming the parsed
    network's dimensions breaks TensorRT's shape analysis. (None, []) when no input
    has such a name, so most models are parsed straight from their file.
    """
    import onnx
    from google.protobuf.message import DecodeError

    try:
        # Weights stored outside the file stay there: only the graph is read.
        model = onnx.load(str(onnx_path), load_external_data=False)
    except (DecodeError, OSError, ValueError):
        return None, []  # not readable as ONNX: the parser will say why
    unnamed = []
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param in _UNKNOWN_DIMENSION_NAMES:
                dim.ClearField("dim_param")
                unnamed.append(f"{value.name}[{axis}]")
    if not unnamed:
        return None, []
    return model.SerializeToString(), unnamed


def _check_dimension_names(
    network: trt.INetworkDefinition, ranges: dict[str, ShapeRange]
) -> None:
    """Refuse ranges that give different sizes to dimensions sharing one name.

    TensorRT builds such dimensions as equal and fails with a terse message about
    the profile; this says which dimensions and what to do.
    """
    named: dict[str, list[tuple[str, int]]] = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        for axis in range(len(tensor.shape)):
            name = tensor.get_dimension_name(axis)
            if name and tensor.name in ranges:
                named.setdefault(name, []).append((tensor.name, axis))
    for name, dims in named.items():
        if len(dims) < 2:
            continue
        for which, position in (("min", 0), ("opt", 1), ("max", 2)):
            sizes = [ranges[tensor][position][axis] for tensor, axis in dims]
            if len(set(sizes)) > 1:
                where = ", ".join(f"{tensor!r} dimension {axis}" for tensor, axis in dims)
                raise BuildError(
                    f"dimensions {where} share the name {name!r} in the model, and TensorRT "
                    f"builds dimensions with one name as equal, but the {which} shapes give "
                    f"them {sizes}: give them equal sizes in every shape, or give the "
                    "dimensions distinct names (ONNX dim_param) in the model"
                )


def _input_ranges(io_tensors: list[IOTensor], options: BuildOptions) -> dict[str, ShapeRange]:
    """(min, opt, max) for every input, from `batch` and `shapes` (static inputs: their shape)."""
    inputs = [t for t in io_tensors if t.mode == "input"]
    unknown = sorted(set(options.shapes) - {t.name for t in inputs})
    if unknown:
        raise BuildError(
            f"shapes given for {unknown}, which are not inputs of the model; "
            f"its inputs are {[t.name for t in inputs]}"
        )
    ranges = {}
    for tensor in inputs:
        dims = tensor.shape
        if tensor.name in options.shapes:
            ranges[tensor.name] = _given_range(tensor, options.shapes[tensor.name], options.batch)
            continue
        low, opt, high = list(dims), list(dims), list(dims)
        if dims and dims[0] == -1 and options.batch is not None:  # scalars have no dim 0
            low[0], opt[0], high[0] = options.batch
        dynamic = [i for i, d in enumerate(low) if d == -1]
        if dynamic:
            raise DynamicShapeError(tensor.name, dims, dynamic)
        ranges[tensor.name] = (tuple(low), tuple(opt), tuple(high))
    return ranges


def _given_range(
    tensor: IOTensor, given: ShapeRange, batch: tuple[int, int, int] | None
) -> ShapeRange:
    """Check a user-given shape range against the input's rank and static dimensions."""
    dims = tensor.shape
    if len(given[0]) != len(dims):
        raise BuildError(
            f"shapes for input {tensor.name!r} have rank {len(given[0])}, "
            f"but the input has shape {list(dims)}"
        )
    for axis, size in enumerate(dims):
        if size != -1 and any(shape[axis] != size for shape in given):
            raise BuildError(
                f"shapes for input {tensor.name!r} set dimension {axis} to "
                f"{[s[axis] for s in given]}, but the model fixes it at {size}"
            )
    if batch is not None and dims and dims[0] == -1 and tuple(s[0] for s in given) != batch:
        raise BuildError(
            f"shapes for input {tensor.name!r} give dimension 0 as "
            f"{[s[0] for s in given]}, which disagrees with batch {list(batch)}"
        )
    return given


def _missing(trt_module: types.ModuleType, what: str) -> str:
    name, version = library_info(trt_module)
    return f"{name} {version} has no {what}"


def _apply_settings(
    trt_module: types.ModuleType,
    config: trt.IBuilderConfig,
    options: BuildOptions,
    settings: _Settings,
) -> None:
    """Set the optional builder settings the library offers; record the rest as unavailable."""
    for wanted, flag_name in ((options.fp16, "FP16"), (options.bf16, "BF16")):
        if not wanted:
            continue
        # TensorRT-RTX and TensorRT 11 have no precision flags: precision follows
        # the model's types (strong typing).
        flag = getattr(trt_module.BuilderFlag, flag_name, None)
        if flag is None:
            why = _missing(trt_module, f"BuilderFlag.{flag_name}")
            if not options.allow_precision_fallback:
                raise BuildError(
                    f"{flag_name.lower()} was asked for but cannot be applied: {why} (it "
                    "takes precisions from the model's types: convert the model, e.g. to "
                    "FP16, instead); --allow-precision-fallback (build.allow_precision_fallback "
                    "in a config file) builds in the model's own precisions anyway"
                )
            settings.unavailable[flag_name.lower()] = (
                f"{why}; built in the model's own precisions (allow_precision_fallback)"
            )
        else:
            config.set_flag(flag)
            settings.applied[flag_name.lower()] = True
    attributes = {
        "max_aux_streams": options.max_aux_streams,
        "builder_optimization_level": options.builder_optimization_level,
        "avg_timing_iterations": options.avg_timing_iterations,
    }
    for attribute, value in attributes.items():
        if value is None:
            continue
        if hasattr(config, attribute):
            setattr(config, attribute, value)
            settings.applied[attribute] = value
        else:
            settings.unavailable[attribute] = _missing(trt_module, f"IBuilderConfig.{attribute}")
    if options.workspace_mib is not None:
        config.set_memory_pool_limit(
            trt_module.MemoryPoolType.WORKSPACE, options.workspace_mib << 20
        )
        settings.applied["workspace_mib"] = options.workspace_mib


# ---------------------------------------------------------------------------------
# Timing cache


@dataclass(frozen=True)
class _TimingCacheLoad:
    path: Path
    bytes_before: int | None  # None: no file yet
    accepted: bool  # the library took the file's cache
    note: str | None


def _load_timing_cache(config: trt.IBuilderConfig, path: Path) -> _TimingCacheLoad:
    """Give the builder the cache at `path` if there is one, else an empty cache to fill."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    note = None
    if data and not accepted:
        # Made by another library version or GPU: start afresh, then overwrite it.
        note = f"{path} did not match this library or GPU; a new cache replaces it"
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return _TimingCacheLoad(path, len(data) if path.is_file() else None, bool(data) and accepted,
                            note)


# What libraries say when they do not use a timing cache at all: tensorrt_rtx warns
# "Timing cache operations are no-ops in TensorRT-RTX" and logs the second.
_CACHE_IGNORED_WARNING = ("timing cache", "no-op")
_CACHE_IGNORED_LOG = "timing cache will not be used"


def _finish_timing_cache(
    trt_module: types.ModuleType,
    config: trt.IBuilderConfig,
    load: _TimingCacheLoad,
    library_warnings: list[str],
    log: _CapturedLog,
) -> dict[str, Any]:
    """Save the cache where the library used one; report what happened to it.

    `status`: "ignored" (the library does not use timing caches: nothing was loaded or
    saved, the file is left as it was), "loaded" (the file's cache was taken; whether
    its entries fit this model's layers, the library does not say), "rejected" (the file
    was made by another library version or GPU; a new cache replaced it) or "created".
    """
    notes = [w for w in library_warnings if all(k in w.lower() for k in _CACHE_IGNORED_WARNING)]
    notes += [line.message for line in log.lines if _CACHE_IGNORED_LOG in line.message.lower()]
    report: dict[str, Any] = {
        "path": str(load.path),
        "bytes_before": load.bytes_before,
        "library_notes": notes,
    }
    if notes:
        name, version = library_info(trt_module)
        return report | {
            "status": "ignored",
            "saved": False,
            "bytes_after": load.bytes_before,
            "note": f"{name} {version} does not use timing caches (its own note: "
            f"{notes[0]!r}); nothing was loaded or saved",
        }
    data = memoryview(config.get_timing_cache().serialize())
    _write_atomically(load.path, data)
    if load.accepted:
        status = "loaded"
    elif load.bytes_before:
        status = "rejected"
    else:
        status = "created"
    return report | {
        "status": status,
        "saved": True,
        "bytes_after": data.nbytes,
        "note": load.note,
    }


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
