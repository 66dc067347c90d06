"""Engine build settings as users write them, in one place for every front end.

`trtserve build` and `trtserve serve` take the same build flags (`add_build_flags`),
and a config file the same settings as `[models.build]` keys (`BuildConfig`). Flags
become BuildConfig values (`build_overrides`), and one function turns a BuildConfig
into the BuildOptions a build takes (`build_options`), so the three spellings cannot
drift apart. `advice` says how to give a missing shape range in each spelling.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtserve.service.build.options import (
    BuildOptions,
    DynamicShapeError,
    OptionError,
    default_batch_opt,
    parse_batch_range,
    parse_shape_range,
    parse_shape_ranges,
)
from trtserve.service.config import BuildConfig
from trtserve.service.errors import ConfigError

# The largest batch a served model gets when neither build.batch nor max_batch_size
# says (the same default as an ONNX model served by ONNX Runtime).
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class _Flag:
    field: str  # BuildConfig (and BuildOptions) field
    flag: str
    metavar: str | None
    help: str
    kind: Callable[[str], Any] | None = None  # None: a switch


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that checks the text with `parse` and keeps the text (argparse
    then names the flag in the error, and a config file holds the same text)."""

    def check(text: str) -> str:
        try:
            parse(text)
        except OptionError as err:
            raise argparse.ArgumentTypeError(err.detail) from None
        return text

    return check


FLAGS = (
    _Flag("profiles", "--profiles", "N", "optimization profiles, one per worker (default 1)", int),
    _Flag(
        "batch",
        "--batch",
        "MIN:OPT:MAX",
        "range of dimension 0 of every input; MIN:MAX picks OPT as a multiple of 32",
        _checked(lambda text: BuildOptions(batch=parse_batch_range(text))),
    ),
    _Flag(
        "shapes",
        "--shape",
        "NAME=MIN:OPT:MAX",
        "range of an input with other dynamic dimensions, each shape like 1x3x224x224 "
        "(repeatable)",
        _checked(lambda text: BuildOptions(shapes=dict([parse_shape_range(text)]))),
    ),
    _Flag(
        "max_aux_streams",
        "--max-aux-streams",
        "K",
        "auxiliary streams TensorRT may use within one inference (0: single stream)",
        int,
    ),
    _Flag("fp16", "--fp16", None, "build FP16 kernels where faster (TensorRT's BuilderFlag.FP16)"),
    _Flag("bf16", "--bf16", None, "build BF16 kernels where faster (TensorRT's BuilderFlag.BF16)"),
    _Flag(
        "allow_precision_fallback",
        "--allow-precision-fallback",
        None,
        "build even if the library cannot apply --fp16/--bf16 (the engine keeps the model's "
        "precisions; the manifest says so); without it that is an error",
    ),
    _Flag("strongly_typed", "--strongly-typed", None, "take every precision from the model"),
    _Flag("builder_optimization_level", "--builder-optimization-level", "L", "0 to 5", int),
    _Flag("avg_timing_iterations", "--avg-timing-iterations", "N", "timing runs per tactic", int),
    _Flag(
        "timing_cache",
        "--timing-cache",
        "PATH",
        "timing cache to load if present and save after the build (where the library uses one)",
        str,
    ),
    _Flag(
        "mps_percentage",
        "--mps-percentage",
        "P",
        "build with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=P (needs a running MPS daemon)",
        int,
    ),
    _Flag("workspace_mib", "--workspace-mib", "M", "builder workspace limit", int),
)

_FLAG_FOR_FIELD = {f.field: f.flag for f in FLAGS}


def flag_for(field: str) -> str:
    """The flag of a BuildOptions field ('shapes[...]' -> '--shape')."""
    return _FLAG_FOR_FIELD.get(field.split("[")[0], "--" + field.replace("_", "-"))


def add_build_flags(group: argparse._ActionsContainer) -> None:
    """Add the build flags. Every one defaults to None: not given."""
    for flag in FLAGS:
        if flag.kind is None:
            group.add_argument(
                flag.flag, dest=f"build_{flag.field}", action="store_true", default=None,
                help=flag.help,
            )
        elif flag.field == "shapes":
            group.add_argument(
                flag.flag, dest="build_shapes", type=flag.kind, action="append", default=None,
                metavar=flag.metavar, help=flag.help,
            )
        else:
            group.add_argument(
                flag.flag, dest=f"build_{flag.field}", type=flag.kind, default=None,
                metavar=flag.metavar, help=flag.help,
            )


def build_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The BuildConfig values the given build flags set (flags not given: absent)."""
    overrides: dict[str, Any] = {}
    for flag in FLAGS:
        value = getattr(args, f"build_{flag.field}", None)
        if value is not None:
            overrides[flag.field] = tuple(value) if flag.field == "shapes" else value
    return overrides


def build_options(
    build: BuildConfig, *, max_batch_size: int = 0, timing_cache: Path | None = None
) -> BuildOptions:
    """The BuildOptions a BuildConfig describes. Raises OptionError naming the field.

    `max_batch_size` > 0 (a served model's) makes the default batch range
    1:OPT:max_batch_size where `build.batch` is empty and no shape range gives one;
    `timing_cache` is used where `build.timing_cache` is empty.
    """
    shapes = parse_shape_ranges(build.shapes)
    batch = parse_batch_range(build.batch) if build.batch else None
    if batch is None and shapes:
        # The shape ranges give dimension 0 themselves; a default batch could only
        # contradict them. (Unequal ones among themselves are refused by the build.)
        low, opt, high = next(iter(shapes.values()))
        batch = (low[0], opt[0], high[0]) if low else None
    elif batch is None and max_batch_size > 0:
        batch = (1, default_batch_opt(1, max_batch_size), max_batch_size)
    cache = Path(build.timing_cache) if build.timing_cache else timing_cache
    return BuildOptions(
        profiles=build.profiles,
        batch=batch,
        shapes=shapes,
        max_aux_streams=None if build.max_aux_streams < 0 else build.max_aux_streams,
        fp16=build.fp16,
        bf16=build.bf16,
        strongly_typed=build.strongly_typed,
        builder_optimization_level=None
        if build.builder_optimization_level < 0
        else build.builder_optimization_level,
        avg_timing_iterations=None if build.avg_timing_iterations < 0
        else build.avg_timing_iterations,
        timing_cache=cache,
        allow_precision_fallback=build.allow_precision_fallback,
        mps_percentage=build.mps_percentage or None,
        workspace_mib=build.workspace_mib or None,
    )


def advice(err: DynamicShapeError, *, config_key: str | None = None) -> str:
    """How to give the range `err` misses, as flags (and, with `config_key`, as keys)."""
    name = err.tensor
    fix = f"pass --shape {name}=MIN:OPT:MAX (shapes like 1x3x224x224)"
    if err.batch_only:
        fix += " or --batch MIN:OPT:MAX"
    if config_key is not None:
        fix += f", or set {config_key} shapes = [\"{name}=MIN:OPT:MAX\"]"
        if err.batch_only:
            fix += f' or {config_key} batch = "MIN:OPT:MAX"'
    return f"{err.problem()}; {fix}"


class BuildConfigError(ConfigError):
    """A build setting is invalid; `field` names the BuildConfig field."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"build.{field}: {detail}")
        self.field = field
        self.detail = detail


def check_build_config(build: BuildConfig) -> None:
    """Raise BuildConfigError (a ConfigError) if `build` makes no valid BuildOptions."""
    try:
        build_options(build)
    except OptionError as err:
        field = err.field.split("[")[0]
        raise BuildConfigError(field, err.detail) from None
