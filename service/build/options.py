"""What a TensorRT engine build is asked for: `BuildOptions`, checked when made.

Also the two errors a build raises: `OptionError` for an invalid option, `BuildError`
when the model cannot be turned into an engine. Pure Python; no TensorRT needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trtserve.service.backends.tensorrt.api import Shape

# Tensor cores run FP16/INT8 GEMMs best when the batch is a multiple of this.
TENSOR_CORE_BATCH_MULTIPLE = 32

ShapeRange = tuple[Shape, Shape, Shape]


class BuildError(RuntimeError):
    """The model could not be turned into an engine (parse, shapes, MPS, or the build itself)."""


class DynamicShapeError(BuildError):
    """An input has a dynamic dimension that no option gives a range for.

    The message names the options abstractly ("a shape range", "the batch range"):
    each front end (`trtserve build`, `trtserve serve`, a config file) says it again
    with its own flag or key, from the fields here.
    """

    def __init__(self, tensor: str, shape: Shape, dynamic_axes: list[int]) -> None:
        self.tensor = tensor
        self.shape = tuple(shape)
        self.dynamic_axes = list(dynamic_axes)
        super().__init__(self.problem() + ": give its shape range" + (
            " or the batch range" if self.batch_only else ""))

    @property
    def batch_only(self) -> bool:
        """Only dimension 0 is dynamic, so a batch range alone would do."""
        return self.dynamic_axes == [0]

    def problem(self) -> str:
        return (
            f"input {self.tensor!r} has shape {list(self.shape)} with dynamic "
            f"dimension(s) {self.dynamic_axes}"
        )


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
    # A requested fp16/bf16 the library cannot apply fails the build unless this is set
    # (then the engine keeps the model's own precisions and the manifest says so).
    allow_precision_fallback: bool = False
    mps_percentage: int | None = None
    workspace_mib: int | None = None

    def __post_init__(self) -> None:
        _check_int("profiles", self.profiles, low=1, optional=False)
        _check_int("max_aux_streams", self.max_aux_streams, low=0)
        _check_int("builder_optimization_level", self.builder_optimization_level, low=0, high=5)
        _check_int("avg_timing_iterations", self.avg_timing_iterations, low=1)
        _check_int("mps_percentage", self.mps_percentage, low=1, high=100)
        _check_int("workspace_mib", self.workspace_mib, low=1)
        for name in ("fp16", "bf16", "strongly_typed", "allow_precision_fallback"):
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


# ---------------------------------------------------------------------------------
# The text forms every front end shares: `trtserve build` and `trtserve serve` flags,
# and `[models.build]` keys. Each raises OptionError naming the field.


def parse_batch_range(text: str) -> tuple[int, int, int]:
    """MIN:OPT:MAX, or MIN:MAX / MIN::MAX to let OPT default to a multiple of 32."""
    parts = text.split(":")
    try:
        numbers = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise OptionError("batch", f"expected MIN:OPT:MAX integers, got {text!r}") from None
    if len(numbers) == 2:
        numbers.insert(1, None)
    low, opt, high = numbers if len(numbers) == 3 else (None, None, None)
    if low is None or high is None:
        raise OptionError("batch", f"expected MIN:OPT:MAX or MIN:MAX, got {text!r}")
    return low, opt if opt is not None else default_batch_opt(low, high), high


def parse_shape_range(text: str) -> tuple[str, ShapeRange]:
    """NAME=MIN:OPT:MAX with each shape written like 1x3x224x224."""
    name, sep, ranges = text.partition("=")
    shapes = ranges.split(":")
    if not sep or not name or len(shapes) != 3:
        raise OptionError(
            "shapes", f"expected NAME=MIN:OPT:MAX (shapes like 1x3x224x224), got {text!r}"
        )
    try:
        low, opt, high = (tuple(int(d) for d in shape.split("x")) for shape in shapes)
    except ValueError:
        raise OptionError(
            "shapes",
            f"shapes must be integers joined by 'x' (like 1x3x224x224), got {text!r}",
        ) from None
    return name.strip(), (low, opt, high)


def parse_shape_ranges(texts: list[str] | tuple[str, ...]) -> dict[str, ShapeRange]:
    """Several NAME=MIN:OPT:MAX, each input named once."""
    shapes: dict[str, ShapeRange] = {}
    for text in texts:
        name, shape_range = parse_shape_range(text)
        if name in shapes:
            raise OptionError("shapes", f"{name!r} given more than once (in {list(texts)!r})")
        shapes[name] = shape_range
    return shapes
