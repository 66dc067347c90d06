"""The JSON manifest `build_engine` writes next to each engine: where it is, reading it.

`model.engine` -> `model.engine.json`. `build` assembles and writes it;
`inspect` falls back on it where the engine cannot be loaded.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trtserve.service.build.options import ShapeRange

MANIFEST_VERSION = 1


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


def _profile_json(index: int, shapes: Mapping[str, ShapeRange]) -> dict[str, Any]:
    return {
        "index": index,
        "inputs": {
            name: {"min": list(low), "opt": list(opt), "max": list(high)}
            for name, (low, opt, high) in shapes.items()
        },
    }
