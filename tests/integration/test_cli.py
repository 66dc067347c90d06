"""The README's commands: `trtserve serve` as a process, `trtserve-client` against it."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from trtserve.service.testing.servers import ROOT, ServerProcess


@pytest.fixture(scope="module")
def served(example_onnx):
    server = ServerProcess(["--model", f"example={example_onnx}", "--workers", "2"])
    server.wait_ready()
    yield server
    code, output = server.terminate()
    assert code == 0, output


def client(url, *args):
    return subprocess.run([sys.executable, "-m", "trtserve.client.cli", "--url", url, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_infer_with_npy_input_matches_onnxruntime(served, example_onnx, tmp_path):
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = client(served.url, "infer", "--model", "example", "--input",
                    f"input={tmp_path / 'x.npy'}", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "output: dtype=float32 shape=[3, 16]" in result.stdout
    got = np.load(tmp_path / "out" / "output.npy")
    want = ort.InferenceSession(str(example_onnx)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_random_infer_then_stats_count_it(served):
    before = json.loads(client(served.url, "stats", "--json").stdout)
    result = client(served.url, "infer", "--model", "example", "--rows", "4")
    assert result.returncode == 0, result.stderr
    after = json.loads(client(served.url, "stats", "--json").stdout)
    count = lambda s: int(s["models"][0].get("inferences", 0))  # noqa: E731
    assert count(after) - count(before) == 4
    table = client(served.url, "stats")
    assert table.returncode == 0 and "model example (onnxruntime)" in table.stdout
    assert "worker" in table.stdout and "inline" in table.stdout


def test_the_server_runs_on_uvloop_with_trtserves_grpc_settings(served):
    """What the benchmarks measure is what `trtserve serve` runs: say so in its log."""
    assert "event loop: uvloop.Loop" in served.output()


def test_metadata_and_health(served):
    md = json.loads(client(served.url, "metadata", "--model", "example").stdout)
    assert md["inputs"][0]["name"] == "input"
    assert client(served.url, "health").returncode == 0
    assert client(served.url, "health", "--service", "example").returncode == 0


def test_errors_exit_nonzero_with_the_status(served):
    result = client(served.url, "infer", "--model", "nope")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "nope" in result.stderr


def test_bad_config_is_refused_naming_the_key(tmp_path, example_onnx):
    config = tmp_path / "bad.toml"
    config.write_text(f'[[models]]\nname = "m"\npath = "{example_onnx}"\nworkerz = 2\n')
    result = subprocess.run([sys.executable, "-m", "trtserve.service.cli", "serve", "--config",
                             str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "workerz" in result.stderr
