"""The README's HTTP/REST examples (curl and tritonclient.http), run as written against
`trtserve serve` with its HTTP port on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from trtserve.service.testing.servers import ROOT, ServerProcess, free_port

SECTION = "Over HTTP/REST (port 8000)"


def _blocks() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    sh = re.search(r"```sh\n(.*?)```", section, re.S)
    py = re.search(r"```python\n(.*?)```", section, re.S)
    assert sh and py, "the README's HTTP examples are missing"
    return {"sh": sh.group(1), "python": py.group(1)}


def _documents(text: str) -> list[object]:
    """The JSON documents curl printed one after another (the ready check prints none)."""
    decoder, found, index = json.JSONDecoder(), [], 0
    while index < len(text.strip()):
        document, index = decoder.raw_decode(text, index)
        found.append(document)
    return found


@pytest.fixture(scope="module")
def served(example_onnx):
    port = free_port()
    server = ServerProcess(["--model", f"example={example_onnx}", "--workers", "1",
                            "--http-port", str(port)])
    server.wait_ready()
    yield port
    code, output = server.terminate()
    assert code == 0, output


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_curl_example_runs(served):
    script = _blocks()["sh"].replace("127.0.0.1:8000", f"127.0.0.1:{served}")
    lines = [line.split("  #")[0] for line in script.splitlines()]
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    metadata, answer = _documents(result.stdout)
    assert metadata["name"] == "example"
    assert answer["model_name"] == "example" and answer["outputs"][0]["shape"] == [1, 16]


def test_the_tritonclient_http_example_runs(served):
    code = _blocks()["python"].replace("127.0.0.1:8000", f"127.0.0.1:{served}")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 16)"
