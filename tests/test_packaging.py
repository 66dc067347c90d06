"""What the two distributions install: namespaced packages, and a client that stands alone.

The server's distribution (pyproject.toml, `trtserve`) installs `trtserve.service`;
the client's (client/pyproject.toml, `trtserve-client`) installs `trtserve.client`.
Nothing installs a top-level `service` or `client`, the test harness stays out of
the wheel, and the client imports and serves calls without any of the server's
dependencies.
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest

from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import running_server, server_config

ROOT = Path(__file__).resolve().parents[1]


def _listed(pyproject: Path) -> set[str]:
    return set(tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["packages"])


def _folders(folder: str, package: str, leave_out: tuple[str, ...] = ()) -> set[str]:
    """Every package under `folder` (a directory holding an __init__.py), as installed."""
    found = set()
    for init in (ROOT / folder).rglob("__init__.py"):
        parts = init.parent.relative_to(ROOT / folder).parts
        if parts and parts[0] in leave_out:
            continue
        found.add(".".join((package, *parts)))
    return found


def test_the_server_distribution_lists_every_package_but_the_test_harness():
    assert _listed(ROOT / "pyproject.toml") == _folders("service", "trtserve.service",
                                                        leave_out=("testing",))


def test_the_client_distribution_lists_every_client_package():
    # client/build: setuptools' staging of a client wheel built here (gitignored)
    assert _listed(ROOT / "client" / "pyproject.toml") == _folders("client", "trtserve.client",
                                                                   leave_out=("build",))


def _wheel(project: Path, out: Path) -> zipfile.ZipFile:
    if project != ROOT:  # the client is self-contained: build a copy, leave no build/ here
        project = Path(shutil.copytree(project, out / "src", ignore=shutil.ignore_patterns(
            "build", "*.egg-info", "__pycache__")))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(out), str(project)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _requirements(wheel: zipfile.ZipFile) -> list[str]:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = email.parser.Parser().parsestr(wheel.read(name).decode())
    return [r for r in metadata.get_all("Requires-Dist") or [] if "extra ==" not in r]


@pytest.mark.slow
def test_the_client_wheel_holds_the_client_and_needs_only_grpc_protobuf_numpy(tmp_path):
    wheel = _wheel(ROOT / "client", tmp_path)
    modules = [n for n in wheel.namelist() if n.endswith(".py")]
    assert modules and all(n.startswith("trtserve/client/") for n in modules), modules
    assert "trtserve/client/gen/trtserve/v1/inference_pb2.py" in modules
    assert "trtserve/client/gen/inference/grpc_service_pb2_grpc.py" in modules
    assert not any(n.startswith("trtserve/__init__") for n in wheel.namelist()), \
        "trtserve must stay a namespace both distributions share"
    names = sorted(r.split(">")[0].split("=")[0].split("<")[0].strip()
                   for r in _requirements(wheel))
    assert names == ["grpcio", "grpcio-health-checking", "numpy", "protobuf"]


@pytest.mark.slow
def test_the_server_wheel_is_namespaced_and_leaves_out_the_client_and_test_harness(tmp_path):
    wheel = _wheel(ROOT, tmp_path)
    modules = [n for n in wheel.namelist() if n.endswith(".py")]
    assert all(n.startswith("trtserve/service/") for n in modules), \
        [n for n in modules if not n.startswith("trtserve/service/")]
    assert "trtserve/service/cli.py" in modules
    assert "trtserve/service/gen/trtserve/internal/link_pb2.py" in modules
    assert not any(n.startswith("trtserve/service/testing/") for n in modules)
    assert any(r.startswith("trtserve-client") for r in _requirements(wheel))


# Run in a fresh interpreter that cannot import the server or its dependencies.
_CLIENT_ALONE = textwrap.dedent("""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        BLOCKED = ("trtserve.service", "onnxruntime", "onnx", "uvloop", "aiohttp",
                   "prometheus_client", "service", "client")

        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
                raise ImportError(f"the client imported {name}")
            return None

    sys.meta_path.insert(0, Refuse())
    import numpy as np
    from trtserve.client import Client, KServeClient

    url = sys.argv[1]
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    with Client(url) as c:
        print(c.infer("example", {"input": x}))
    with KServeClient(url) as k:
        print(k.infer("example", {"input": x}))
""")


def test_the_client_calls_a_server_without_importing_any_server_dependency(example_onnx,
                                                                            tmp_path):
    config = ModelConfig(name="example", path=str(example_onnx), workers=1)
    with running_server(server_config(config)) as server:
        result = subprocess.run([sys.executable, "-c", _CLIENT_ALONE, server.url],
                                capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("'output'") == 2, result.stdout
