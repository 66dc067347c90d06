"""The Node.js example client (examples/node) against a live `trtserve serve` process.

Node loads protos/trtserve/v1/inference.proto at run time with @grpc/proto-loader and
builds its tensors by hand, so this checks the wire contract from a second language:
its outputs must match ONNX Runtime run directly on the same input.

Skipped only when `node` or `npm` is not on PATH, and never in CI (CI=true, as .ci/run
is run, or TRTSERVE_REQUIRE_NODE=1): there a missing Node.js fails, so CI cannot pass
by skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from trtserve.service.testing.servers import ROOT, ServerProcess

NODE_DIR = ROOT / "examples" / "node"
FEATURES = 64  # the example model: input FP32 [-1, 64] -> output FP32 [-1, 16]


def _require_node() -> None:
    missing = [tool for tool in ("node", "npm") if shutil.which(tool) is None]
    if not missing:
        return
    reason = f"{' and '.join(missing)} not on PATH (the Node.js client test needs Node.js 18+)"
    if os.environ.get("CI") == "true" or os.environ.get("TRTSERVE_REQUIRE_NODE") == "1":
        pytest.fail(f"{reason}; CI must run this test (.ci/run installs nodejs and npm)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def node_client() -> Path:
    """examples/node with its dependencies installed from package-lock.json."""
    _require_node()
    installed = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm ci failed:\n{done.stdout}\n{done.stderr}"
    return NODE_DIR / "client.js"


@pytest.fixture(scope="module")
def server(example_onnx: Path, node_client: Path):
    proc = ServerProcess(["--model", f"example={example_onnx}", "--workers", "2"])
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.terminate()


def run_client(client: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(client), *args], cwd=client.parent,
                          capture_output=True, text=True, timeout=60)


def infer_json(client: Path, url: str, rows: int) -> dict[str, Any]:
    done = run_client(client, "--url", url, "--model", "example", "--rows", str(rows))
    assert done.returncode == 0, f"node client failed ({done.returncode}):\n{done.stderr}"
    return json.loads(done.stdout)


def sin_input(rows: int) -> np.ndarray:
    """What client.js sends: element i (row-major) is sin(i), rounded to float32."""
    return np.sin(np.arange(rows * FEATURES, dtype=np.float64)).astype(np.float32).reshape(
        rows, FEATURES)


def test_node_client_infer_matches_onnxruntime_and_stats_count_it(server, node_client,
                                                                    example_onnx):
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])

    first = infer_json(node_client, server.url, rows=5)
    assert first["model"] == "example"
    assert first["backend"] == "onnxruntime"
    assert first["inputs"] == [{"name": "input", "dtype": "DATA_TYPE_FP32", "shape": [5, 64]}]
    [out] = first["outputs"]
    assert (out["name"], out["dtype"], out["shape"]) == ("output", "DATA_TYPE_FP32", [5, 16])
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    expected = session.run(None, {"input": sin_input(5)})[0]
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero arrays
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    # This module's server has seen only this client's requests (the error test below
    # asks for an unknown model, which never reaches "example").
    stats = first["stats"]
    assert (stats["requests"], stats["inferences"], stats["batches"], stats["errors"]) == (
        1, 5, 1, 0)
    assert sum(w["requests"] for w in stats["workers"]) == 1
    assert len(stats["workers"]) == 2

    # A second call moves the counters by exactly its own request and rows.
    second = infer_json(node_client, server.url, rows=3)
    [out] = second["outputs"]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, session.run(None, {"input": sin_input(3)})[0],
                               rtol=1e-5, atol=1e-6)
    assert (second["stats"]["requests"], second["stats"]["inferences"]) == (2, 8)


def test_node_client_exits_nonzero_with_the_grpc_status(server, node_client):
    done = run_client(node_client, "--url", server.url, "--model", "no-such-model")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "ModelMetadata failed: NOT_FOUND (5)" in done.stderr
    assert "no-such-model" in done.stderr
