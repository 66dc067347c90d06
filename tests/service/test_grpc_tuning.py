"""gRPC's C-core settings (service/grpc_tuning.py) and the server's event loop choice."""

import asyncio
import os
import subprocess
import sys

import pytest

from trtserve.client import grpc_tuning
from trtserve.service.config import ServerConfig
from trtserve.service.errors import ConfigError
from trtserve.service.server import loop_factory
from trtserve.service.testing.servers import ROOT

PROBE = ("import os, sys; import trtserve.service.cli, grpc, trtserve.client.grpc_tuning as g; "
         "print(repr(os.environ.get('GRPC_EXPERIMENTS')), g.APPLIED_HERE)")


def _probe(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_cli_sets_the_transport_before_grpc_loads():
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    assert _probe(env) == f"{grpc_tuning.EXPERIMENTS!r} True"


def test_a_setting_from_the_environment_wins_even_empty():
    assert _probe({**os.environ, "GRPC_EXPERIMENTS": ""}) == "'' True"
    assert _probe({**os.environ, "GRPC_EXPERIMENTS": "-event_engine_dns"}) == \
        "'-event_engine_dns' True"


def test_event_loop_choices():
    uvloop = pytest.importorskip("uvloop")
    assert loop_factory("asyncio") is None
    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory("auto")) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
    with pytest.raises(ConfigError, match=r"server.event_loop: got 'libuv'"):
        ServerConfig(event_loop="libuv")
