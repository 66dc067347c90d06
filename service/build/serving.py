"""The engine file to serve for a model: its path, or for an .onnx model the engine built
from it with the model's build options and timing cache.

The engine's repository asks for it before the TensorRT backend loads the engine,
so that building sits beside serving (service/backends/tensorrt) rather than under it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trtserve.service.backends.tensorrt.api import library_info
from trtserve.service.backends.tensorrt.load import EngineLoadError
from trtserve.service.config import ModelConfig
from trtserve.service.errors import ConfigError

log = logging.getLogger(__name__)


def engine_for(config: ModelConfig) -> Path:
    """The engine file to serve: the model's path, or for an .onnx model the engine
    built from it (rebuilt unless one built with the same options and library exists)."""
    path = Path(config.path)
    if path.suffix.lower() != ".onnx":
        return path
    from trtserve.service.build.build import BuildError, build_engine, load_manifest, manifest_path
    from trtserve.service.build.options import DynamicShapeError, OptionError
    from trtserve.service.build.settings import DEFAULT_MAX_BATCH, advice, build_options

    build = config.build
    engine = Path(build.engine) if build.engine else path.with_suffix(".engine")
    cache = path.with_suffix(".timing-cache")
    try:
        options = build_options(build, max_batch_size=config.max_batch_size or DEFAULT_MAX_BATCH,
                                timing_cache=cache)
    except OptionError as err:
        raise ConfigError(f"model '{config.name}': build.{err.field}: {err.detail}") from None
    if engine.is_file() and manifest_path(engine).is_file() and \
            engine.stat().st_mtime >= path.stat().st_mtime:
        manifest = load_manifest(engine)
        name, version = library_info()
        if manifest.get("options") == options.to_json() and \
                manifest.get("library") == {"name": name, "version": version}:
            log.info("model '%s': reusing %s (built from %s with the same options)",
                     config.name, engine, path)
            return engine
    log.info("model '%s': building %s from %s", config.name, engine, path)
    try:
        manifest = build_engine(path, engine, options)
    except DynamicShapeError as err:
        # Name what `trtserve serve` and its config file take, not `trtserve build`'s flags.
        raise EngineLoadError(
            f"model '{config.name}': {advice(err, config_key='[models.build]')}") from None
    except BuildError as err:
        raise EngineLoadError(f"model '{config.name}': {err}") from None
    cache_use = manifest.get("timing_cache") or {}
    log.info("model '%s': built in %.1fs (timing cache %s)", config.name,
             manifest.get("build_seconds", 0.0), cache_use.get("status", "not used"))
    for setting, why in manifest["settings"]["unavailable"].items():
        log.warning("model '%s': %s not applied: %s", config.name, setting, why)
    return engine
