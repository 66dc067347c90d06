"""mypy on the TensorRT modules, against the types in tensorrt-stubs.

The stubs cannot be used as installed: their `tensorrt/` package has no py.typed
marker, so mypy skips it (and with `ignore_missing_imports` every TensorRT type
silently becomes Any), and a few signatures are not valid Python (a parameter named
`in`, a required parameter after defaulted ones). The test copies the stubs, repairs
those lines and points MYPYPATH at the copy. A deliberately wrong snippet checks that
the stubs really are in effect, so the test cannot pass by typing nothing.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = [
    "trtserve.service.backends.tensorrt.api",
    "trtserve.service.build.build",
    "trtserve.service.build.inspect",
    "trtserve.service.build.log",
    "trtserve.service.backends.tensorrt.load",
    "trtserve.service.backends.tensorrt.executor",
    "trtserve.service.backends.tensorrt.cuda",
    "trtserve.service.build.serving",
]
STUB_PACKAGES = ("tensorrt", "tensorrt_bindings")

pytest.importorskip("mypy", reason="mypy is not installed")


def _stub_dir(package: str) -> Path | None:
    """The site-packages folder of a stub package (found on sys.path, not imported)."""
    for entry in sys.path:
        candidate = Path(entry) / package
        if (candidate / "__init__.pyi").is_file():
            return candidate
    return None


def _repair_signature(line: str) -> str:
    """Make one stub `def` line valid Python, keeping its name and return type."""
    line = re.sub(r"\bin: ", "in_: ", line)
    try:
        ast.parse(line.strip() + " ...")
        return line
    except SyntaxError:
        pass
    # Still invalid (a required parameter after defaulted ones): accept any arguments.
    match = re.match(r"(?P<indent>\s*)def (?P<name>\w+)\(.*\)(?P<returns>\s*->\s*.+)?:\s*$", line)
    if match is None:
        return line
    return (
        f"{match['indent']}def {match['name']}(*args: Any, **kwargs: Any){match['returns'] or ''}:"
    )


def _repaired_stubs(target: Path) -> Path:
    for package in STUB_PACKAGES:
        source = _stub_dir(package)
        if source is None:
            pytest.skip(f"tensorrt-stubs is not installed (no {package}/__init__.pyi on sys.path)")
        (target / package).mkdir(parents=True)
        for stub in source.glob("*.pyi"):
            lines = [
                _repair_signature(line) if line.lstrip().startswith("def ") else line
                for line in stub.read_text().splitlines()
            ]
            # The stubs' own flaws (e.g. a module-level `bool` that shadows the builtin
            # in annotations) are not ours to report.
            # `Any` for the repaired signatures; imported last so `from __future__` stays first.
            text = "# mypy: ignore-errors\n" + "\n".join(lines) + "\nfrom typing import Any\n"
            (target / package / stub.name).write_text(text)
        (target / package / "py.typed").write_text("")
    return target


def _installed_layout(target: Path) -> Path:
    """The tree as installed (trtserve/service, trtserve/client), by links: mypy finds
    packages by folder and cannot follow the editable install's import hook."""
    (target / "trtserve").mkdir(parents=True)
    for folder in ("service", "client"):
        (target / "trtserve" / folder).symlink_to(ROOT / folder, target_is_directory=True)
    return target


def _mypy(stubs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": f"{stubs}{os.pathsep}{stubs.parent / 'layout'}"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-incremental",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed")
    base = tmp_path_factory.mktemp("typecheck")
    _installed_layout(base / "layout")
    return _repaired_stubs(base / "stubs")


def test_stubs_are_in_effect(stubs: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "import tensorrt as trt\n\n"
        "def aux(engine: trt.ICudaEngine) -> str:\n"
        "    return engine.num_aux_streams\n"
    )
    result = _mypy(stubs, str(wrong))
    assert result.returncode != 0 and "Incompatible return value" in result.stdout, (
        "mypy did not apply the tensorrt stubs, so checking our modules would prove "
        f"nothing:\n{result.stdout}{result.stderr}"
    )


def test_trt_modules_typecheck(stubs: Path) -> None:
    result = _mypy(stubs, *(arg for module in CHECKED for arg in ("-m", module)))
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"
