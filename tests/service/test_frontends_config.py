"""`server.frontends` and `--frontends`: "auto" or a count, refused by name otherwise."""

from __future__ import annotations

import argparse
import os

import pytest

from trtserve.service.cli import build_config, main
from trtserve.service.config import MAX_AUTO_FRONTENDS, ServerConfig
from trtserve.service.errors import ConfigError


@pytest.mark.parametrize("value", [0, -1, 65, "many", True, 2.0])
def test_a_bad_count_is_refused_naming_the_key_and_value(value: object) -> None:
    with pytest.raises(ConfigError, match=r"server\.frontends: got .*expected 'auto' or 1\.\.64"):
        ServerConfig(frontends=value)  # type: ignore[arg-type]


def test_auto_is_one_process_on_two_cores_and_half_the_cores_above() -> None:
    cores = len(os.sched_getaffinity(0))
    want = 1 if cores <= 2 else min(MAX_AUTO_FRONTENDS, cores // 2)
    assert ServerConfig().resolved_frontends == want
    assert ServerConfig(frontends=3).resolved_frontends == 3


def test_the_flag_sets_the_key() -> None:
    import argparse

    from trtserve.service.cli import add_serve

    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m=x.onnx", "--frontends", "4"])
    assert build_config(args).frontends == 4
    args = parser.parse_args(["serve", "--model", "m=x.onnx", "--frontends", "auto"])
    assert build_config(args).frontends == "auto"


def test_a_bad_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", "m=x.onnx", "--frontends", "lots"])
    assert e.value.code == 2
    assert "expected 'auto' or a number, got 'lots'" in capsys.readouterr().err


def test_log_lines_name_the_engine_only_when_there_are_frontends(example_onnx) -> None:
    """`auto` decides after the flags are read: one process on this host writes no
    process name, the engine of N frontends writes `engine`."""
    from trtserve.service.testing.servers import ServerProcess

    label = "engine " if ServerConfig().resolved_frontends > 1 else ""
    server = ServerProcess(["--model", f"example={example_onnx}", "--workers", "1"])
    with server.serving():
        pass
    serving = [line for line in server.output().splitlines() if "serving 1 model" in line]
    assert len(serving) == 1, server.output()
    assert f" INFO {label}trtserve.service." in serving[0], serving[0]


@pytest.mark.parametrize(("flag", "want"), [("auto", "auto"), ("250", 250), ("0", 0)])
def test_the_spin_flags_take_auto_or_microseconds(flag: str, want: int | str) -> None:
    from trtserve.service.cli import add_serve

    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m=x.onnx", "--frontend-spin-us", flag,
                              "--engine-spin-us", flag])
    config = build_config(args)
    assert (config.frontend_spin_us, config.engine_spin_us) == (want, want)


def test_frontend_spin_us_from_the_config_file(tmp_path) -> None:
    from trtserve.service.config import load_toml

    path = tmp_path / "server.toml"
    path.write_text('[server]\nfrontend_spin_us = "auto"\n')
    assert load_toml(path).frontend_spin_us == "auto"
    path.write_text("[server]\nfrontend_spin_us = 300\n")
    assert load_toml(path).resolved_frontend_spin_us == 300
    path.write_text('[server]\nfrontend_spin_us = "often"\n')
    with pytest.raises(ConfigError, match=r"server\.frontend_spin_us: got 'often', "
                                          r"expected 'auto' or 0\.\.100000"):
        load_toml(path)
    path.write_text("[server]\nengine_spin_us = 100001\n")
    with pytest.raises(ConfigError, match=r"server\.engine_spin_us: got 100001"):
        load_toml(path)
