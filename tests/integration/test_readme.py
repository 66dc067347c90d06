"""The README's Python snippets, run as they are against a live server.

Each ```python block that calls 127.0.0.1:8001 runs in a fresh interpreter with
the test server's address in its place; each must exit 0 and print what its
comments say it prints. A snippet that defines a coroutine and never runs it
prints nothing, which fails here.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from trtserve.service.testing.servers import ROOT, ServerProcess

ADDRESS = "127.0.0.1:8001"


def _snippets() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    return [block for block in blocks if ADDRESS in block]


def _expected(snippet: str) -> list[str]:
    """What the snippet's `print(...)  # comment` lines say they print."""
    return [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s+#\s*(.+)$", snippet,
                                                    re.MULTILINE)]


SNIPPETS = _snippets()


def test_the_readme_has_the_snippets_this_runs() -> None:
    """Guards against running nothing: the Client, AsyncClient and tritonclient ones."""
    assert len(SNIPPETS) >= 3
    assert any("AsyncClient(" in snippet for snippet in SNIPPETS)


@pytest.fixture(scope="module")
def served(example_onnx):
    server = ServerProcess(["--model", f"example={example_onnx}"])
    server.wait_ready()
    yield server
    code, output = server.terminate()
    assert code == 0, output


@pytest.mark.parametrize("snippet", SNIPPETS,
                         ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs_and_prints_what_it_says(served, snippet: str) -> None:
    done = subprocess.run([sys.executable, "-c", snippet.replace(ADDRESS, served.url)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "the snippet printed nothing"
    printed = done.stdout.splitlines()
    for line in _expected(snippet):
        assert line in printed, f"expected {line!r} in {printed}"


def test_readme_lists_the_kserve_rpcs_that_are_not_implemented() -> None:
    """The README's table of UNIMPLEMENTED RPCs and the servicer agree, both ways."""
    from trtserve.service.frontends.kserve import _NOT_IMPLEMENTED

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("RPCs answer UNIMPLEMENTED with the reason:"):]
    table = table[:table.index("\n\n", table.index("| RPC |"))]
    listed = set(re.findall(r"`(\w+)`", "\n".join(
        line.split("|")[1] for line in table.splitlines() if line.startswith("| `"))))
    assert listed == set(_NOT_IMPLEMENTED)
