"""The repository's model control seen through LocalEngine (engine/api): health events,
loads racing the server's stop, and the index. Real ONNX Runtime models."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.doubles.controlled import (
    INPUT,
    OUTPUT,
    WIDTH,
    ControlledBackend,
    Controls,
    controlled_model,
    expected,
)
from trtserve.service.engine.api import InferRequest, TensorIn
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import LoadFailed, NotFound, PermissionDenied, Unavailable
from trtserve.service.testing.onnx_models import offset_net


@pytest.fixture
def files(tmp_path: Path) -> dict[int, Path]:
    return {k: offset_net(tmp_path / f"plus{k}.onnx", float(k)) for k in (1, 2)}


def _workers(name: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"{name}-worker-")]


async def _offset(engine: LocalEngine, model: str = "m", version: str = "") -> tuple[str, float]:
    x = np.zeros((1, 4), np.float32)
    result = await engine.infer(InferRequest(model, {"input": TensorIn("FP32", x.shape, x)},
                                             version=version))
    data = result.outputs["output"].data
    assert isinstance(data, np.ndarray)
    return result.version, float(data[0, 0])


async def test_listeners_hear_loads_reloads_and_unloads(files):
    repository = ModelRepository()
    engine = LocalEngine(repository)
    heard: list[tuple[str, bool]] = []
    engine.add_health_listener(lambda model, serving: heard.append((model, serving)))
    try:
        await engine.load_model("m", str(files[1]))
        assert await _offset(engine) == ("1", 1.0)
        await engine.reload_model("m", str(files[2]))
        assert await _offset(engine) == ("2", 2.0)
        assert await _offset(engine, version="2") == ("2", 2.0)
        assert engine.describe("m", "2").version == "2"
        # The version replaced is gone, for requests and descriptions alike.
        with pytest.raises(NotFound, match="no version '1'; version '2' is served"):
            await _offset(engine, version="1")
        with pytest.raises(NotFound, match="version '2' is served"):
            engine.describe("m", "1")
        await engine.unload_model("m")
        with pytest.raises(NotFound, match="not loaded"):
            await _offset(engine)
        assert heard == [("m", True), ("m", True), ("m", False)]
        assert not engine.ready("m") and engine.ready()
        [state] = await engine.repository_index()
        assert (state.name, state.version, state.state, state.path) == (
            "m", "2", "UNAVAILABLE", str(files[2]))
        assert _workers("m") == []
    finally:
        await repository.stop()


async def test_a_load_that_ends_after_the_stop_began_is_not_served(files):
    repository = ModelRepository()
    engine = LocalEngine(repository)
    load = asyncio.create_task(engine.load_model("late", str(files[1])))
    await asyncio.sleep(0)  # the load has begun: it is reading the file off the loop
    await repository.drain()
    with pytest.raises(Unavailable, match="shutting down"):
        await load
    assert engine.models() == [] and _workers("late") == []
    with pytest.raises(Unavailable):
        await engine.load_model("later", str(files[1]))


async def test_control_off_refuses_but_lists(files):
    repository = ModelRepository()
    await repository.load_named("m", str(files[1]))
    engine = LocalEngine(repository, model_control=False)
    try:
        for call in (engine.load_model("m"), engine.unload_model("m"), engine.reload_model("m")):
            with pytest.raises(PermissionDenied, match="model_control"):
                await call
        assert [s.state for s in await engine.repository_index()] == ["READY"]
        # The server's own file watch reloads whatever model control says.
        assert (await engine.reload("m", str(files[2]))).version == "2"
    finally:
        await repository.stop()


async def test_a_failed_load_keeps_what_served(files, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"nope")
    repository = ModelRepository()
    engine = LocalEngine(repository)
    try:
        await engine.load_model("m", str(files[1]))
        with pytest.raises(LoadFailed, match=r"model 'm' \(.*broken.onnx\).*still serves"):
            await engine.load_model("m", str(broken))
        assert await _offset(engine) == ("1", 1.0)
        assert _workers("m") and len(_workers("m")) == 2
    finally:
        await repository.stop()


async def test_the_old_version_answers_what_it_accepted_after_the_switch(files):
    """Version 1 (the controlled double) holds a batch at its gate; a reload switches
    to version 2 meanwhile, which serves new requests at once, while the reload waits
    for version 1 to answer, on version 1, every request it had accepted."""
    controls = Controls()
    repository = ModelRepository()
    await repository.add(ControlledBackend(controls).runtime(controlled_model(
        "m", workers=1, max_batch_size=2, max_queue_delay_us=0, inline_below_us=0)))
    engine = LocalEngine(repository)
    try:
        controls.hold()
        xs = [np.full((1, WIDTH), i, np.float32) for i in range(5)]
        accepted = [asyncio.create_task(engine.infer(InferRequest(
            "m", {INPUT: TensorIn("FP32", x.shape, x)}))) for x in xs]
        # One batch is at the gate (in flight); the others wait in version 1's queue.
        assert await asyncio.to_thread(controls.started.wait, 30)
        reload = asyncio.create_task(engine.reload_model("m", str(files[2])))

        async def switched() -> None:
            while engine.describe("m").version != "2":
                await asyncio.sleep(0.01)

        await asyncio.wait_for(switched(), 30)
        assert await _offset(engine) == ("2", 2.0)  # new requests: version 2, at once
        assert not reload.done() and not any(t.done() for t in accepted)
        controls.release()
        for x, result in zip(xs, await asyncio.gather(*accepted), strict=True):
            assert result.version == "1"
            np.testing.assert_array_equal(result.outputs[OUTPUT].data, expected(x))
        assert (await reload).version == "2"
        assert controls.snapshot()[0] == len(xs)  # version 1 ran every row it accepted
        assert len(_workers("m")) == 1  # its worker is gone; version 2's remains
    finally:
        controls.release()
        await repository.stop()
