"""The seam holds: the protocol side imports only engine/api, and what crosses it is data."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np

from tests.doubles.controlled import INPUT, WIDTH, ControlledBackend, controlled_model
from trtserve.service.engine.api import InferRequest, InferResult, RegionRef, TensorIn, TensorOut
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.repository import ModelRepository

SERVICE = Path(__file__).resolve().parents[2] / "service"
# The protocol side: it may reach the engine through engine/api.py only.
PROTOCOL_SIDE = [*sorted((SERVICE / "frontends").glob("*.py")),
                 *sorted(SERVICE.glob("metrics*.py"))]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_protocol_side_imports_only_the_engines_api():
    assert len(PROTOCOL_SIDE) > 10
    reaching_in = {
        str(path.relative_to(SERVICE)): sorted(
            name for name in _imports(path)
            if (name.startswith("trtserve.service.engine")
                and not name.startswith("trtserve.service.engine.api"))
            or name.startswith(("trtserve.service.backends", "trtserve.service.build"))
            or name == "trtserve.service.engine")
        for path in PROTOCOL_SIDE}
    assert {path: names for path, names in reaching_in.items() if names} == {}


def test_serving_does_not_import_the_build_and_the_engine_not_the_protocol_side():
    serving = sorted((SERVICE / "backends").rglob("*.py"))
    engine = sorted((SERVICE / "engine").glob("*.py"))
    assert serving and engine
    wrong = {str(p.relative_to(SERVICE)): sorted(n for n in _imports(p)
                                                 if n.startswith("trtserve.service.build"))
             for p in serving}
    wrong |= {str(p.relative_to(SERVICE)): sorted(
        n for n in _imports(p)
        if n.startswith(("trtserve.service.frontends", "trtserve.service.metrics",
                         "trtserve.service.server")))
        for p in engine}
    assert {path: names for path, names in wrong.items() if names} == {}


async def test_what_crosses_the_seam_survives_a_process_boundary_as_data():
    repository = ModelRepository()
    await repository.add(ControlledBackend().runtime(controlled_model("m", max_batch_size=8)))
    engine = LocalEngine(repository)
    try:
        x = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
        request = InferRequest("m", {INPUT: TensorIn("FP32", x.shape, x),
                                     "other": TensorIn("FP32", (1,), RegionRef("r", 0, 4))},
                               outputs=("y",), deadline=12.5)
        copy = pickle.loads(pickle.dumps(request))
        assert (copy.model, copy.outputs, copy.deadline, copy.inputs["other"].data) == (
            "m", ("y",), 12.5, RegionRef("r", 0, 4))
        np.testing.assert_array_equal(copy.inputs[INPUT].data, x)
        result = await engine.infer(InferRequest("m", {INPUT: TensorIn("FP32", x.shape, x)}))
        again = pickle.loads(pickle.dumps(result))
        assert isinstance(again, InferResult) and isinstance(again.outputs["y"], TensorOut)
        np.testing.assert_array_equal(again.outputs["y"].data, result.outputs["y"].data)
        for value in (engine.describe("m"), await engine.stats()):
            assert pickle.loads(pickle.dumps(value)) == value
    finally:
        await repository.stop()
