"""The repository folder's layout (engine/folder.py), read from real files, and its
config key and flag."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest

from trtserve.service.cli import add_serve, build_config
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.folder import scan
from trtserve.service.errors import ConfigError
from trtserve.service.server import Server
from trtserve.service.testing.onnx_models import offset_net


@pytest.fixture(scope="module")
def onnx(tmp_path_factory) -> Path:
    return offset_net(tmp_path_factory.mktemp("net") / "plus1.onnx", 1.0)


def _put(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


def test_the_highest_version_holding_a_model_file_is_served(onnx, tmp_path):
    data = onnx.read_bytes()
    _put(tmp_path / "m" / "1" / "model.onnx", data)
    _put(tmp_path / "m" / "3" / "model.onnx", data)
    (tmp_path / "m" / "7").mkdir()  # a version folder still empty: not a version yet
    (tmp_path / "m" / "latest").mkdir()  # not a number: ignored
    _put(tmp_path / "m" / "0" / "model.onnx", data)  # versions start at 1
    models = scan(str(tmp_path))
    assert list(models) == ["m"]
    m = models["m"]
    assert (m.version, m.error) == ("3", "")
    assert m.config is not None and m.config.path == str(tmp_path / "m" / "3" / "model.onnx")
    assert m.config.resolved_backend == "onnxruntime"


def test_config_toml_gives_the_models_settings_and_its_backend_picks_the_file(onnx, tmp_path):
    data = onnx.read_bytes()
    _put(tmp_path / "m" / "2" / "model.onnx", data)
    _put(tmp_path / "m" / "2" / "model.plan", b"an engine")
    [plan] = scan(str(tmp_path)).values()  # TensorRT's file first when nothing decides
    assert plan.config is not None and plan.config.path.endswith("model.plan")

    _put(tmp_path / "m" / "config.toml", b'backend = "onnxruntime"\nworkers = 1\n'
                                         b'max_queue_delay_us = 500\n')
    [m] = scan(str(tmp_path)).values()
    assert m.config is not None and m.config.path.endswith("model.onnx")
    assert (m.config.workers, m.config.max_queue_delay_us) == (1, 500)
    assert m.stats != plan.stats  # the config file is part of what the watch compares


@pytest.mark.parametrize("toml, expected", [
    (b"workers = 'two'\n", "models.m.workers: expected int, got 'two'"),
    (b"workers = 0\n", "models.m.workers: got 0, expected 1..256"),
    (b"wrokers = 2\n", "unknown key(s) ['wrokers']"),
    (b"workers = \n", "config.toml: Invalid value"),
    (b"path = 'elsewhere.onnx'\n", "['path']: a model's name and file come from the "
                                    "repository folder"),
])
def test_a_bad_config_toml_is_the_models_error_naming_file_and_key(onnx, tmp_path, toml,
                                                                   expected):
    _put(tmp_path / "m" / "1" / "model.onnx", onnx.read_bytes())
    _put(tmp_path / "m" / "config.toml", toml)
    _put(tmp_path / "ok" / "1" / "model.onnx", onnx.read_bytes())
    models = scan(str(tmp_path))
    assert models["ok"].config is not None  # the others are not affected
    assert models["m"].config is None
    assert expected in models["m"].error
    assert str(tmp_path / "m" / "config.toml") in models["m"].error


def _odd_entries(root: Path, model: bytes) -> None:
    """Entries that once made the whole folder unreadable, each beside a good model."""
    _put(root / "ok" / "1" / "model.onnx", model)
    _put(root / "latin1" / "1" / "model.onnx", model)
    _put(root / "latin1" / "config.toml", b"workers = 1\n# caf\xe9, a Latin-1 comment\n")
    _put(root / "cubed" / "\u00b3" / "model.onnx", model)  # '³'.isdigit(), but int('³') fails
    (root / "loop").symlink_to(root / "loop")
    _put(root / "looped" / "1" / "model.onnx", model)
    (root / "looped" / "2").symlink_to(root / "looped" / "2")


def test_an_entry_that_cannot_be_read_is_only_its_models_error(onnx, tmp_path):
    _odd_entries(tmp_path, onnx.read_bytes())
    _put(tmp_path / "served" / "\u00b3" / "model.onnx", b"not a version")
    _put(tmp_path / "served" / "1" / "model.onnx", onnx.read_bytes())
    models = scan(str(tmp_path))
    assert sorted(models) == ["cubed", "latin1", "loop", "looped", "ok", "served"]
    assert [name for name, m in models.items() if m.config is not None] == ["ok", "served"]
    assert models["served"].version == "1"  # '³' is no version, as 'latest' is none
    assert models["latin1"].error == (
        f"{tmp_path}/latin1/config.toml: not UTF-8 text, as TOML must be: byte 0xe9 at "
        "offset 17 (invalid continuation byte)")
    assert models["cubed"].empty and "a number from 1 in digits 0-9" in models["cubed"].error
    assert models["loop"].error.startswith(
        f"{tmp_path}/loop: cannot tell whether it is a model folder or a model file (")
    assert models["looped"].error.startswith(f"{tmp_path}/looped/2: ")


def test_an_entry_that_cannot_be_read_fails_only_its_model_at_start(onnx, tmp_path):
    _odd_entries(tmp_path, onnx.read_bytes())
    config = ServerConfig(port=0, metrics_port=0, http_port=0, model_repository=str(tmp_path))
    # Named, as any model that fails at start (it was "unexpected error: UnicodeDecodeError").
    with pytest.raises(ConfigError, match=r"^model 'latin1': .*/latin1/config.toml: not UTF-8"):
        Server(config)._read_folder()
    server = Server(dataclasses.replace(config, model_load_failure="skip"))
    assert [(m.name, version) for m, version in server._read_folder()] == [("ok", "1")]
    assert sorted(server.models.failed) == ["latin1", "loop", "looped"]
    assert "/loop: cannot tell whether" in server.models.failed["loop"]


def test_flat_files_hidden_files_and_conflicts(onnx, tmp_path):
    data = onnx.read_bytes()
    _put(tmp_path / "flat.onnx", data)
    _put(tmp_path / ".hidden.onnx", data)  # being written, to be renamed into place
    _put(tmp_path / "staged.onnx.tmp", data)
    _put(tmp_path / "notes.txt", b"")
    _put(tmp_path / "both.onnx", data)
    _put(tmp_path / "both" / "1" / "model.onnx", data)
    (tmp_path / "empty").mkdir()
    _put(tmp_path / "bad name!.onnx", data)
    models = scan(str(tmp_path))
    assert sorted(models) == ["bad name!", "both", "empty", "flat"]
    assert (models["flat"].version, models["flat"].error) == ("1", "")
    assert "keep one" in models["both"].error and models["both"].config is None
    assert models["empty"].empty and "no version folder holds a model file" in (
        models["empty"].error)
    assert "letters, digits" in models["bad name!"].error


def test_the_flag_sets_the_key_and_a_repository_needs_no_other_model(tmp_path):
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model-repository", str(tmp_path),
                              "--model-watch-interval-s", "2"])
    config = build_config(args)
    assert (config.model_repository, config.model_watch_interval_s, config.models) == (
        str(tmp_path), 2.0, ())
    with pytest.raises(ConfigError, match="--model-repository DIR"):
        build_config(parser.parse_args(["serve"]))


def test_model_flags_with_a_folder_say_whom_they_apply_to(tmp_path, caplog):
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    build_config(parser.parse_args(["serve", "--model-repository", str(tmp_path),
                                    "--workers", "1", "--shape", "x=1:2:4"]))
    assert ("--workers, --shape set every model's setting for --model and [[models]] "
            "models only") in caplog.text
    assert "NAME/config.toml" in caplog.text


def test_a_missing_folder_or_a_name_in_both_places_is_a_config_error(onnx, tmp_path):
    missing = ServerConfig(port=0, metrics_port=0, http_port=0,
                           model_repository=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"server.model_repository: got .*nope"):
        Server(missing)._read_folder()
    _put(tmp_path / "m.onnx", onnx.read_bytes())
    both = ServerConfig(port=0, metrics_port=0, http_port=0, model_repository=str(tmp_path),
                        models=(ModelConfig(name="m", path=str(onnx)),))
    with pytest.raises(ConfigError, match=r"\['m'\] are \[\[models\]\] and in the repository"):
        Server(both)._read_folder()
    assert os.path.isfile(tmp_path / "m.onnx")
