"""`trtserve build` and `trtserve inspect`: build a TensorRT engine from ONNX, describe one.

`trtserve.service.cli` calls `register(subparsers)`; each subcommand's `func` takes the parsed
arguments and returns the exit code.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

from trtserve.service.build.build import (
    BuildError,
    BuildOptions,
    DynamicShapeError,
    OptionError,
    build_engine,
    describe_engine,
    manifest_path,
)
from trtserve.service.build.inspect import timing_cache_line
from trtserve.service.build.settings import (
    BuildConfigError,
    add_build_flags,
    advice,
    build_options,
    build_overrides,
    flag_for,
)
from trtserve.service.config import BuildConfig


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `build` and `inspect` subcommands."""
    build = subparsers.add_parser(
        "build",
        help="build a TensorRT engine from an ONNX model",
        description="Build a TensorRT engine from an ONNX model, with one optimization "
        "profile per worker, and write a JSON manifest next to it (ENGINE.json).",
    )
    build.add_argument("model", type=Path, metavar="MODEL.onnx", help="the ONNX model")
    build.add_argument(
        "-o", "--output", type=Path, required=True, metavar="MODEL.engine", help="engine to write"
    )
    # The same flags as `trtserve serve` takes for an .onnx model (build/settings.py).
    add_build_flags(build)
    build.set_defaults(func=functools.partial(_run_build, build))

    inspect = subparsers.add_parser(
        "inspect",
        help="describe a TensorRT engine",
        description="Show an engine's IO tensors, profiles, aux streams (and the builder's "
        "notes on them), settings not applied, timing-cache use and layers (fused ones "
        "marked): from the engine where a GPU can load it, else from its manifest. Given "
        "an ONNX model, say so and show its IO.",
    )
    inspect.add_argument("engine", type=Path, metavar="MODEL.engine")
    inspect.set_defaults(func=_run_inspect)


def _options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> BuildOptions:
    try:
        return build_options(BuildConfig(**build_overrides(args)))
    except (BuildConfigError, OptionError) as err:
        parser.error(f"argument {flag_for(err.field)}: {err.detail}")  # exits with status 2


def _run_build(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    options = _options(parser, args)
    started = time.perf_counter()
    try:
        manifest = build_engine(args.model, args.output, options)
    except DynamicShapeError as err:
        print(f"trtserve build: error: {advice(err)}", file=sys.stderr)
        return 1
    except (BuildError, RuntimeError) as err:
        print(f"trtserve build: error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - started
    library = manifest["library"]
    aux = manifest["aux_streams"]
    cache = manifest["timing_cache"]
    print(f"built {args.output} in {seconds:.2f} s with {library['name']} {library['version']}")
    print(f"  profiles       {len(manifest['profiles'])}")
    for name, shapes in manifest["profiles"][0]["inputs"].items():
        low, opt, high = ("x".join(map(str, shapes[k])) for k in ("min", "opt", "max"))
        print(f"    {name}: min {low}  opt {opt}  max {high}")
    count = aux["num_aux_streams"]
    requested = aux["max_aux_streams"]
    print(
        f"  aux streams    {'unknown (engine not loaded here)' if count is None else count}"
        f", max_aux_streams {'library default' if requested is None else requested}"
    )
    for message in aux["builder_messages"]:
        print(f"    builder: {message}")
    print(f"  timing cache   {'not used' if cache is None else timing_cache_line(cache)}")
    per_profile = " (per profile)" if len(manifest["profiles"]) > 1 else ""
    print(f"  fused layers   {len(manifest['fused_layers'])}{per_profile}")
    for setting, value in manifest["settings"]["applied"].items():
        print(f"  applied        {setting}: {value}")
    for setting, why in manifest["settings"]["unavailable"].items():
        print(f"  not applied    {setting}: {why}")
    print(f"  manifest       {manifest_path(args.output)}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    try:
        print(describe_engine(args.engine))
    except (BuildError, RuntimeError, FileNotFoundError) as err:
        print(f"trtserve inspect: error: {err}", file=sys.stderr)
        return 1
    return 0
