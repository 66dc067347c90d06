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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.backends.trt_api import (
    IOTensor,
    Shape,
    engine_io,
    gpu_present,
    import_tensorrt,
    library_info,
    network_io,
    profile_shapes,
)

if TYPE_CHECKING:
    import types

    import tensorrt as trt

MANIFEST_VERSION = 1
# Tensor cores run FP16/INT8 GEMMs best when the batch is a multiple of this.
TENSOR_CORE_BATCH_MULTIPLE = 32
MPS_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MPS_PIPE_DIRECTORY_ENV = "CUDA_MPS_PIPE_DIRECTORY"
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"
# The builder log of a large model runs to thousands of lines; the manifest keeps a
# readable slice: INFO and above, each line cut, the head and tail of the whole.
_LOG_LINE_CHARS = 400
_LOG_MAX_LINES = 400
_LOG_SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO")

ShapeRange = tuple[Shape, Shape, Shape]


class BuildError(RuntimeError):
    """The model could not be turned into an engine (parse, shapes, MPS, or the build itself)."""


class OptionError(ValueError):
    """A build option is invalid. `field` names the BuildOptions field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.detail = message


def default_batch_opt(low: int, high: int) -> int:
    """OPT for a batch range: the largest multiple of 32 in [low, high], else high.

    TensorRT tunes its kernels for OPT; a multiple of 32 suits tensor cores, and the
    largest one suits a server whose batcher fills batches under load.
    """
    best = (high // TENSOR_CORE_BATCH_MULTIPLE) * TENSOR_CORE_BATCH_MULTIPLE
    return best if best >= max(low, 1) else high


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BuildOptions:
    """How to build an engine. Every field is checked when the options are made.

    `batch` is (min, opt, max) for dimension 0 of every input. `shapes` gives full
    (min, opt, max) shapes per input name, for inputs with other dynamic dimensions;
    where both apply, dimension 0 of the shapes must agree with `batch`.
    """

    profiles: int = 1
    batch: tuple[int, int, int] | None = None
    shapes: Mapping[str, ShapeRange] = field(default_factory=dict)
    max_aux_streams: int | None = None
    fp16: bool = False
    bf16: bool = False
    strongly_typed: bool = False
    builder_optimization_level: int | None = None
    avg_timing_iterations: int | None = None
    timing_cache: Path | None = None
    mps_percentage: int | None = None
    workspace_mib: int | None = None

    def __post_init__(self) -> None:
        _check_int("profiles", self.profiles, low=1, optional=False)
        _check_int("max_aux_streams", self.max_aux_streams, low=0)
        _check_int("builder_optimization_level", self.builder_optimization_level, low=0, high=5)
        _check_int("avg_timing_iterations", self.avg_timing_iterations, low=1)
        _check_int("mps_percentage", self.mps_percentage, low=1, high=100)
        _check_int("workspace_mib", self.workspace_mib, low=1)
        for name in ("fp16", "bf16", "strongly_typed"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(name, f"expected True or False, got {getattr(self, name)!r}")
        if self.strongly_typed and (self.fp16 or self.bf16):
            raise OptionError(
                "strongly_typed",
                f"cannot be combined with fp16 or bf16 (got fp16={self.fp16}, "
                f"bf16={self.bf16}): a strongly typed network takes its precisions from the model",
            )
        if self.batch is not None:
            batch = tuple(self.batch)
            if not (
                len(batch) == 3
                and all(_is_int(d) for d in batch)
                and 1 <= batch[0] <= batch[1] <= batch[2]
            ):
                raise OptionError(
                    "batch",
                    "expected (min, opt, max) integers with 1 <= min <= opt <= max, "
                    f"got {self.batch!r}",
                )
            object.__setattr__(self, "batch", batch)
        object.__setattr__(
            self, "shapes", {n: _check_shape_range(n, r) for n, r in self.shapes.items()}
        )
        if self.timing_cache is not None:
            if not isinstance(self.timing_cache, (str, Path)):
                raise OptionError("timing_cache", f"expected a path, got {self.timing_cache!r}")
            object.__setattr__(self, "timing_cache", Path(self.timing_cache))

    def to_json(self) -> dict[str, Any]:
        options = asdict(self)
        options["timing_cache"] = str(self.timing_cache) if self.timing_cache else None
        options["shapes"] = {n: [list(s) for s in r] for n, r in self.shapes.items()}
        options["batch"] = list(self.batch) if self.batch else None
        return options


def _check_int(
    name: str, value: object, low: int, high: int | None = None, optional: bool = True
) -> None:
    if value is None and optional:
        return
    in_range = (
        isinstance(value, int)
        and not isinstance(value, bool)  # True is an int to Python, not a count to us
        and low <= value
        and (high is None or value <= high)
    )
    if not in_range:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise OptionError(name, f"expected an integer {bounds}, got {value!r}")


def _check_shape_range(name: str, shape_range: Any) -> ShapeRange:
    """The range as tuples, checked: `shape_range` is whatever the caller passed."""
    where = f"shapes[{name!r}]"
    try:
        low, opt, high = (tuple(shape) for shape in shape_range)
    except (TypeError, ValueError):
        raise OptionError(where, f"expected (min, opt, max) shapes, got {shape_range!r}") from None
    if not all(_is_int(d) and d >= 1 for d in low + opt + high):
        raise OptionError(where, f"dimensions must be positive integers, got {shape_range!r}")
    if not len(low) == len(opt) == len(high):
        raise OptionError(where, f"min, opt and max must have the same rank, got {shape_range!r}")
    if any(not lo <= op <= hi for lo, op, hi in zip(low, opt, high, strict=True)):
        raise OptionError(
            where, f"min <= opt <= max must hold in every dimension, got {shape_range!r}"
        )
    return low, opt, high


def manifest_path(engine_path: str | Path) -> Path:
    """Where the manifest of an engine lives: the engine path with '.json' appended."""
    return Path(f"{engine_path}.json")


def load_manifest(engine_path: str | Path) -> dict[str, Any]:
    """The manifest written by `build_engine` next to this engine."""
    path = manifest_path(engine_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest next to the engine: {path} (`trtserve build` writes one)"
        )
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


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
    ):
        warnings.simplefilter("always")
        builder = trt_module.Builder(log.logger)
        # The parser owns weights the network points into: it lives as long as the network.
        network, _parser = _parse_onnx(trt_module, builder, onnx_path, options, settings, log)
        io_tensors = network_io(network)
        ranges = _input_ranges(io_tensors, options)
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
        cache_report = _save_timing_cache(config, cache) if cache else None
    library_warnings = sorted({str(w.message) for w in caught})
    if cache_report is not None:
        cache_report["library_notes"] = [w for w in library_warnings if "timing cache" in w.lower()]
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
    else:
        # What was asked for; the library builds exactly these or fails.
        io_tensors = built.io_tensors
        profiles = [dict(built.ranges) for _ in range(options.profiles)]
        layers = _logged_layers(built.log)
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
            # The builder says why it did or did not use more streams ("[MS] ...").
            "builder_messages": built.log.matching("[MS]"),
        },
        "timing_cache": built.timing_cache,
        "mps": None
        if options.mps_percentage is None
        else {
            "active_thread_percentage": options.mps_percentage,
            "note": "applies only if the building process had not used CUDA before",
        },
        "layers": [layer.to_json() for layer in layers],
        "fused_layers": [layer.to_json() for layer in layers if layer.fused],
        "fusion_log": built.log.matching("Fusing "),
        "library_warnings": built.library_warnings,
        "builder_log": built.log.trimmed(),
    }


@dataclass
class _Settings:
    """What the build applied, and what the installed library could not do (with why)."""

    applied: dict[str, object] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _LogLine:
    severity: str
    message: str


class _CapturedLog:
    """Every builder message, captured through a trt.ILogger subclass."""

    def __init__(self, trt_module: types.ModuleType) -> None:
        self.lines: list[_LogLine] = []
        lines = self.lines

        # The base class comes from whichever library is installed, so the subclass
        # is made here. TensorRT may log from its own threads; list.append is atomic.
        class Logger(trt_module.ILogger):  # type: ignore[name-defined]
            def __init__(self) -> None:
                trt_module.ILogger.__init__(self)

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                lines.append(_LogLine(severity.name, msg))

        self.logger: trt.ILogger = Logger()

    def errors(self) -> str:
        return " | ".join(
            line.message for line in self.lines if line.severity in ("INTERNAL_ERROR", "ERROR")
        )

    def first_error(self) -> str | None:
        errors = [m for m in self.lines if m.severity in ("INTERNAL_ERROR", "ERROR")]
        return errors[0].message if errors else None

    def matching(self, text: str) -> list[str]:
        return [line.message for line in self.lines if text in line.message]

    def split_lines(self) -> Iterator[tuple[str, str]]:
        """(severity, text) per physical line: some messages span many lines."""
        for line in self.lines:
            for text in line.message.splitlines():
                yield line.severity, text

    def trimmed(self) -> list[str]:
        kept = [
            f"{severity}: {text[:_LOG_LINE_CHARS]}"
            for severity, text in self.split_lines()
            if severity in _LOG_SEVERITIES and text.strip()
        ]
        if len(kept) <= _LOG_MAX_LINES:
            return kept
        half = _LOG_MAX_LINES // 2
        return [*kept[:half], f"... {len(kept) - 2 * half} lines left out ...", *kept[-half:]]


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
    if not parser.parse_from_file(str(onnx_path)):
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
        if dims[0] == -1 and options.batch is not None:
            low[0], opt[0], high[0] = options.batch
        dynamic = [i for i, d in enumerate(low) if d == -1]
        if dynamic:
            hint = " or --batch MIN:OPT:MAX" if dynamic == [0] else ""
            raise BuildError(
                f"input {tensor.name!r} has shape {list(dims)} with dynamic dimension(s) "
                f"{dynamic}; give its range with --shape {tensor.name}=MIN:OPT:MAX{hint}"
            )
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
    if batch is not None and dims[0] == -1 and tuple(s[0] for s in given) != batch:
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
            settings.unavailable[flag_name.lower()] = _missing(
                trt_module, f"BuilderFlag.{flag_name}"
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
    loaded: bool
    note: str | None


def _load_timing_cache(config: trt.IBuilderConfig, path: Path) -> _TimingCacheLoad:
    """Give the builder the cache at `path` if there is one, else an empty cache to fill."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    loaded = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    note = None
    if data and not loaded:
        # Made by another library version or GPU: start afresh, then overwrite it.
        note = f"{path} did not match this library or GPU; a new cache was written"
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return _TimingCacheLoad(
        path, len(data) if path.is_file() else None, bool(data) and loaded, note
    )


def _save_timing_cache(config: trt.IBuilderConfig, load: _TimingCacheLoad) -> dict[str, Any]:
    data = memoryview(config.get_timing_cache().serialize())
    _write_atomically(load.path, data)
    return {
        "path": str(load.path),
        "hit": load.loaded,
        "bytes_before": load.bytes_before,
        "bytes_after": data.nbytes,
        "note": load.note,
    }


# ---------------------------------------------------------------------------------
# MPS


@contextlib.contextmanager
def _mps_thread_percentage(percentage: int | None) -> Iterator[None]:
    """Set CUDA_MPS_ACTIVE_THREAD_PERCENTAGE while building, after checking MPS answers."""
    if percentage is None:
        yield
        return
    _require_mps_daemon()
    previous = os.environ.get(MPS_PERCENTAGE_ENV)
    os.environ[MPS_PERCENTAGE_ENV] = str(percentage)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MPS_PERCENTAGE_ENV, None)
        else:
            os.environ[MPS_PERCENTAGE_ENV] = previous


def _require_mps_daemon() -> None:
    if not gpu_present():
        raise BuildError(
            "--mps-percentage needs an NVIDIA GPU with the MPS control daemon running; "
            "this machine has no NVIDIA GPU"
        )
    pipe_directory = Path(os.environ.get(MPS_PIPE_DIRECTORY_ENV, DEFAULT_MPS_PIPE_DIRECTORY))
    start_hint = "start it with `nvidia-cuda-mps-control -d` (see the README's MPS steps)"
    # The daemon listens on a pipe named `control` in its pipe directory.
    if not (pipe_directory / "control").exists():
        raise BuildError(
            f"--mps-percentage: no MPS control daemon answers in {pipe_directory} "
            f"(set {MPS_PIPE_DIRECTORY_ENV} if it uses another directory); {start_hint}"
        )
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        return  # The pipe exists; without the client tool there is nothing more to ask.
    try:
        reply = subprocess.run(
            [control],
            input="get_server_list\n",
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BuildError(
            f"--mps-percentage: the MPS control daemon in {pipe_directory} did not answer "
            f"within 10 s; {start_hint}"
        ) from None
    if reply.returncode != 0:
        said = (reply.stderr or reply.stdout).strip()
        raise BuildError(
            f"--mps-percentage: the MPS control daemon in {pipe_directory} did not answer "
            f"({said or f'exit code {reply.returncode}'}); {start_hint}"
        )


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
    runtime = trt_module.Runtime(log.logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is not None:
        return _Deserialized(runtime, engine, None)
    # The first error says why; later ones repeat it from deeper in the library.
    reason = log.first_error() or "no reason logged"
    if not gpu_present():
        reason = f"this machine has no NVIDIA GPU, which loading an engine needs ({reason})"
    return _Deserialized(None, None, reason)


def _profile_json(index: int, shapes: Mapping[str, ShapeRange]) -> dict[str, Any]:
    return {
        "index": index,
        "inputs": {
            name: {"min": list(low), "opt": list(opt), "max": list(high)}
            for name, (low, opt, high) in shapes.items()
        },
    }


def describe_engine(engine_path: str | Path) -> str:
    """A human-readable account of an engine: IO tensors, profiles, aux streams, layers.

    Uses the engine itself (engine inspector) where it can be loaded, which needs a GPU;
    otherwise the manifest written when it was built.
    """
    engine_path = Path(engine_path)
    if not engine_path.is_file():
        raise FileNotFoundError(f"engine not found: {engine_path}")
    manifest = load_manifest(engine_path) if manifest_path(engine_path).is_file() else None
    try:
        trt_module = import_tensorrt()
    except RuntimeError as err:
        if manifest is None:
            raise
        return _format_description(engine_path, manifest, f"manifest ({err})")
    loaded = _deserialize(trt_module, engine_path.read_bytes())
    if loaded.engine is None:
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
            "num_aux_streams": engine.num_aux_streams,
            "max_aux_streams": (manifest or {}).get("aux_streams", {}).get("max_aux_streams"),
        },
        "layers": [layer.to_json() for layer in _inspector_layers(trt_module, engine)],
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
    layers = summary.get("layers", [])
    fused = [layer for layer in layers if layer["fused"]]
    lines.append(f"layers       {len(layers)}, {len(fused)} fused (*)")
    for layer in layers:
        mark = "*" if layer["fused"] else " "
        covers = f"  <- {' + '.join(layer['onnx_layers'])}" if layer["onnx_layers"] else ""
        kind = f" [{layer['type']}]" if layer["type"] else ""
        lines.append(f"  {mark} {layer['name']}{kind}{covers}")
    return "\n".join(lines)


def _write_atomically(path: Path, data: bytes | memoryview) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)
