"""A model repository folder (`server.model_repository`): the models it holds, read
in one look. The layout is Triton's, for the model kinds trtserve serves:

    DIR/<name>/<version>/model.onnx       (or model.plan, model.engine)
    DIR/<name>/config.toml                optional: the keys of a [[models]] table
                                          for this model, without name and path
    DIR/<name>.onnx                       (or .plan, .engine) a flat file: version 1

<version> is a folder named by a positive integer. Of a model's versions, the
highest that holds a model file is served (Triton's default version policy,
`latest: 1`). In a version folder holding more than one model file, the backend
in config.toml picks (onnxruntime: model.onnx); otherwise model.plan, then
model.engine, then model.onnx. Entries whose name starts with "." and other
files are ignored, so a file written as `DIR/m/2/.model.onnx` (or `m.onnx.tmp`)
and renamed into place is seen only once whole.

Reading the folder blocks (stat, reading config.toml): run `scan` off the event loop.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from typing import Any

from trtserve.service.config import ModelConfig, from_mapping
from trtserve.service.errors import ConfigError

# In the order tried when the backend does not decide.
MODEL_FILES = ("model.plan", "model.engine", "model.onnx")
# Flat files: DIR/<name><suffix>.
FLAT_SUFFIXES = (".onnx", ".plan", ".engine")
CONFIG_FILE = "config.toml"

# (mtime in ns, size, inode) of a file; None: missing.
Stat = tuple[int, int, int] | None


def _stat(path: str) -> Stat:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


@dataclass(frozen=True)
class FolderModel:
    """One model of the folder as read now: what to load, or why it cannot be."""

    name: str
    # The version to serve ("3": the folder DIR/<name>/3); "" when there is none.
    version: str = ""
    config: ModelConfig | None = None
    # Why the model cannot be loaded (a bad config.toml, no version folder...); "" if it can.
    error: str = ""
    # The model file's and config.toml's stat: two looks that agree mean that nothing
    # is being written; a look that differs from the last one acted on means a change.
    stats: tuple[Stat, ...] = ()
    # The model's folder holds no version with a model file (all removed, or the
    # first one not yet there): what served is unloaded.
    empty: bool = False


def scan(root: str) -> dict[str, FolderModel]:
    """Every model in the folder, by name. OSError when the folder itself cannot be read;
    an entry that cannot be read is its own model's error, never the folder's."""
    models: dict[str, FolderModel] = {}
    folders: list[str] = []
    files: list[str] = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                (folders if entry.is_dir() else files).append(entry.name)
            except OSError as e:  # a symlink loop, say: listed with why, the others read on
                stem, suffix = os.path.splitext(entry.name)
                name = stem if suffix.lower() in FLAT_SUFFIXES else entry.name
                models[name] = FolderModel(name, error=(
                    f"{entry.path}: cannot tell whether it is a model folder or a model file "
                    f"({e.strerror})"))
    for name in sorted(folders):
        try:
            models[name] = read_model(root, name)
        except Exception as e:  # unforeseen, yet still this model's error alone
            models[name] = FolderModel(name, error=(
                f"{os.path.join(root, name)}: cannot be read ({type(e).__name__}: {e})"))
    for name in sorted(files):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() not in FLAT_SUFFIXES:
            continue
        if stem in models:
            models[stem] = FolderModel(stem, error=(
                f"both {os.path.join(root, stem)}/ and {os.path.join(root, name)} name model "
                f"'{stem}' in the repository folder; keep one"))
            continue
        models[stem] = _flat(root, stem, name)
    return dict(sorted(models.items()))


def scan_one(root: str, name: str) -> FolderModel | None:
    """The model `name` of the folder as read now; None when the folder has no such model."""
    try:
        return scan(root).get(name)
    except OSError:
        return None


def _flat(root: str, name: str, file: str) -> FolderModel:
    path = os.path.join(root, file)
    return _model(name, "1", path, {}, (_stat(path),))


def read_model(root: str, name: str) -> FolderModel:
    """DIR/<name>/: its config.toml and its highest version holding a model file."""
    folder = os.path.join(root, name)
    config_path = os.path.join(folder, CONFIG_FILE)
    config_stat = _stat(config_path)
    settings: dict[str, Any] = {}
    if config_stat is not None:
        try:
            with open(config_path, "rb") as f:
                settings = tomllib.load(f)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            return FolderModel(name, error=f"{config_path}: {_toml_error(e)}",
                               stats=(config_stat,))
        taken = sorted({"name", "path"} & set(settings))
        if taken:
            return FolderModel(name, error=(
                f"{config_path}: {taken}: a model's name and file come from the repository "
                "folder (DIR/<name>/<version>/model.onnx), not from its config.toml"),
                stats=(config_stat,))
    backend = settings.get("backend", "auto")
    files = ("model.onnx",) if backend == "onnxruntime" else MODEL_FILES
    try:
        with os.scandir(folder) as entries:
            # isdigit() alone takes '³', which int() refuses, and '٣', which it reads as 3.
            versions = sorted((int(e.name) for e in entries
                               if e.name.isascii() and e.name.isdigit() and int(e.name) > 0
                               and e.is_dir()),
                              reverse=True)
    except OSError as e:  # the folder, or one entry of it (a symlink loop): named
        return FolderModel(name, error=f"{e.filename or folder}: {e.strerror}",
                           stats=(config_stat,))
    for version in versions:
        for file in files:
            path = os.path.join(folder, str(version), file)
            stat = _stat(path)
            if stat is not None:
                return _model(name, str(version), path, settings, (stat, config_stat),
                              config_path)
    return FolderModel(name, error=(
        f"{folder}: no version folder holds a model file (expected "
        f"{folder}/<version>/{' or '.join(files)}, <version> a number from 1 in digits 0-9)"),
        stats=(config_stat,), empty=True)


def _toml_error(e: OSError | UnicodeDecodeError | tomllib.TOMLDecodeError) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, UnicodeDecodeError):  # a Latin-1 comment, say
        return (f"not UTF-8 text, as TOML must be: byte {e.object[e.start]:#04x} at offset "
                f"{e.start} ({e.reason})")
    return str(e)


def _model(name: str, version: str, path: str, settings: dict[str, Any],
           stats: tuple[Stat, ...], config_path: str = "") -> FolderModel:
    try:
        config = from_mapping(ModelConfig, {**settings, "name": name, "path": path},
                              f"models.{name}")
    except ConfigError as e:
        where = f"{config_path}: " if config_path and settings else ""
        return FolderModel(name, version, error=f"{where}{e}", stats=stats)
    return FolderModel(name, version, config, stats=stats)

