"""`server.engine_cpus` / `--engine-cpus`: the engine's threads on the cores named, the
frontends on the rest; real `trtserve serve` processes, their threads' affinity read
from /proc."""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_frontends import _frontend_pids
from tests.integration.test_start_errors import refusal, serve
from trtserve.client import Client
from trtserve.service import cpus
from trtserve.service.cli import add_serve, build_config
from trtserve.service.config import ServerConfig, load_toml
from trtserve.service.errors import ConfigError
from trtserve.service.testing.servers import ServerProcess

USABLE = frozenset(os.sched_getaffinity(0))
two_cores = pytest.mark.skipif(len(USABLE) < 2, reason="needs two usable cores")


@pytest.mark.parametrize(("text", "want"), [
    ("3", {3}), ("0-2", {0, 1, 2}), ("0,8-9", {0, 8, 9}), (" 1 , 4-5", {1, 4, 5}),
    ("2-2", {2}),
])
def test_a_cpu_list_parses_and_formats_back(text: str, want: set[int]) -> None:
    assert cpus.parse(text) == want
    assert cpus.parse(cpus.format_list(frozenset(want))) == want


def test_the_shortest_list_is_written() -> None:
    assert cpus.format_list(frozenset({0, 1, 2, 5, 7, 8})) == "0-2,5,7-8"


@pytest.mark.parametrize("text", ["x", "1-", "-1", "3-1", "1,,2", "1.5", "0x1", "0-4000000000"])
def test_a_bad_list_is_refused_naming_the_key(text: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.engine_cpus: got .*a CPU list such as"):
        ServerConfig(engine_cpus=text)


def test_cores_this_process_may_not_use_are_refused_at_start() -> None:
    beyond = max(USABLE) + 1
    with pytest.raises(ConfigError, match=r"may only use CPUs"):
        cpus.plan(str(beyond), 2)


def test_every_core_to_the_engine_leaves_none_to_frontends() -> None:
    every = cpus.format_list(USABLE)
    with pytest.raises(ConfigError, match="leaves no core to the 2 frontends"):
        cpus.plan(every, 2)
    assert cpus.plan(every, 1) == cpus.CpuPlan(USABLE, frozenset())  # one process: allowed
    assert cpus.plan("", 2) is None


def _affinities(pid: int) -> set[frozenset[int]]:
    """The affinity of each thread of process `pid` (a set: equal ones once)."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


@two_cores
def test_the_engine_and_the_frontends_run_on_their_own_cores(example_onnx: Path) -> None:
    engine_core = max(USABLE)
    rest = USABLE - {engine_core}
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2",
                            "--engine-cpus", str(engine_core)])
    with server.serving():
        with Client(server.url) as client:
            x = np.ones((2, 64), np.float32)
            assert client.infer("example", {"input": x})["output"].shape[0] == 2
            frontends = [f.pid for f in client.stats().frontends]
        assert len(frontends) == 2
        assert _affinities(server.proc.pid) == {frozenset({engine_core})}
        for pid in frontends:
            # gRPC's and the loop's threads included: pinned before any started.
            assert len(os.listdir(f"/proc/{pid}/task")) > 1
            assert _affinities(pid) == {rest}
        assert sorted(_frontend_pids(server)) == sorted(frontends)
        # A frontend restarted after a crash goes to the same cores.
        os.kill(frontends[0], signal.SIGKILL)
        end = time.monotonic() + 60
        while (new := [p for p in _frontend_pids(server) if p not in frontends]) == [] or \
                f"(pid {new[0]}) serving" not in server.output():
            assert time.monotonic() < end, f"frontend not restarted:\n{server.output()}"
            time.sleep(0.1)
        assert _affinities(new[0]) == {rest}
    assert f"engine on CPUs {engine_core}, frontends on {cpus.format_list(rest)}" \
        in server.output()


@two_cores
def test_one_process_runs_wholly_on_the_cores_named(example_onnx: Path) -> None:
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "1",
                            "--engine-cpus", "0"])
    with server.serving():
        with Client(server.url) as client:
            client.infer("example", {"input": np.ones((1, 64), np.float32)})
        assert _affinities(server.proc.pid) == {frozenset({0})}


def test_a_core_beyond_the_host_stops_the_start_with_exit_2(example_onnx: Path) -> None:
    line = refusal(serve("--model", f"example={example_onnx}", "--frontends", "2",
                         "--engine-cpus", str(max(USABLE) + 1)))
    assert line.startswith("trtserve: configuration error: server.engine_cpus: got ")
    assert f"may only use CPUs {cpus.format_list(USABLE)}" in line


def test_the_key_comes_from_the_config_file_and_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nengine_cpus = "14-15"\n')
    assert load_toml(path).engine_cpus == "14-15"
    path.write_text('[server]\nengine_cpus = "15-14"\n')
    with pytest.raises(ConfigError, match=r"server\.engine_cpus: got '15-14'"):
        load_toml(path)
    parser = argparse.ArgumentParser()
    add_serve(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "m=x.onnx", "--engine-cpus", "0,2"])
    assert build_config(args).engine_cpus == "0,2"
