"""LocalEngine: the engine in this process, seen only through engine/api's plain data."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from multiprocessing import shared_memory

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
from trtserve.client.dtypes import dtype_name
from trtserve.service.engine.api import (
    MODEL_VERSION,
    InferRequest,
    RegionRef,
    TensorIn,
)
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import InvalidArgument, NotFound, ResourceExhausted, TensorError
from trtserve.service.limits import ByteBudget


@pytest.fixture
async def served() -> AsyncIterator[tuple[LocalEngine, Controls]]:
    controls = Controls()
    repository = ModelRepository()
    await repository.add(ControlledBackend(controls).runtime(
        controlled_model("m", workers=2, max_batch_size=8, max_queue_delay_us=0,
                         worker_retry_backoff_s=3600, worker_retry_backoff_max_s=3600)))
    try:
        yield LocalEngine(repository), controls
    finally:
        await repository.stop()


def _request(x: np.ndarray, **fields: object) -> InferRequest:
    tensor = TensorIn(dtype_name(x.dtype), x.shape, x)
    return InferRequest("m", {INPUT: tensor}, **fields)  # type: ignore[arg-type]


def _rows(n: int, start: float = 0.0) -> np.ndarray:
    return (np.arange(n * WIDTH, dtype=np.float32).reshape(n, WIDTH) + start)


async def test_a_request_in_gives_its_own_answer_out(served):
    engine, _ = served
    xs = [_rows(1 + i % 3, start=100 * i) for i in range(12)]
    results = await asyncio.gather(*(engine.infer(_request(x)) for x in xs))
    for x, result in zip(xs, results, strict=True):
        assert (result.model, result.version) == ("m", MODEL_VERSION)
        assert list(result.outputs) == [OUTPUT]
        out = result.outputs[OUTPUT]
        assert (out.dtype, out.shape) == ("FP32", x.shape)
        np.testing.assert_array_equal(out.data, expected(x))


async def test_describe_is_computed_once_and_names_served_models_when_unknown(served):
    engine, _ = served
    description = engine.describe("m")
    assert engine.describe("m", MODEL_VERSION) is description
    assert (description.name, description.version, description.spec.backend) == (
        "m", MODEL_VERSION, "controlled-double")
    assert description.batching.max_batch_size == 8
    assert [w.profile for w in description.workers] == [0, 0]
    with pytest.raises(NotFound, match=r"'nope' is not served here; served models: \['m'\]"):
        engine.describe("nope")
    with pytest.raises(NotFound, match="has no version '2'"):
        engine.describe("m", "2")
    with pytest.raises(NotFound, match="has no version '2'"):
        await engine.infer(_request(_rows(1), version="2"))
    assert list(engine.models()) == ["m"]


async def test_outputs_are_checked_before_execution(served):
    engine, controls = served
    with pytest.raises(TensorError, match="'nope': unknown output"):
        await engine.infer(_request(_rows(1), outputs=("nope",)))
    with pytest.raises(TensorError, match="requested more than once"):
        await engine.infer(_request(_rows(1), outputs=(OUTPUT, OUTPUT)))
    assert controls.snapshot()[0] == 0  # nothing ran
    result = await engine.infer(_request(_rows(1), outputs=(OUTPUT,)))
    assert list(result.outputs) == [OUTPUT]


async def test_regions_in_and_out_through_the_engine(served):
    engine, controls = served
    nbytes = 2 * 4 * WIDTH
    shm = shared_memory.SharedMemory(create=True, size=2 * nbytes)
    try:
        memory = np.frombuffer(shm.buf, dtype=np.float32)
        memory[:2 * WIDTH] = _rows(2).ravel()
        await engine.register_system_region("r0", shm.name, 0, 2 * nbytes)
        result = await engine.infer(InferRequest(
            "m", {INPUT: TensorIn("FP32", (2, WIDTH), RegionRef("r0", 0, nbytes))},
            output_regions={OUTPUT: RegionRef("r0", nbytes, nbytes)}))
        out = result.outputs[OUTPUT]
        assert (out.dtype, out.shape, out.data) == ("FP32", (2, WIDTH),
                                                   RegionRef("r0", nbytes, nbytes))
        np.testing.assert_array_equal(memory[2 * WIDTH:].reshape(2, WIDTH), expected(_rows(2)))
        usage = (await engine.stats()).shared_memory
        # Read and written through the object's descriptor (the default, "copy").
        assert (usage.input_bytes, usage.output_bytes, usage.zero_copy_inputs) == (
            nbytes, nbytes, 0)
        # Unknown regions and outputs are refused naming the tensor; nothing runs.
        ran = controls.snapshot()[0]
        with pytest.raises(InvalidArgument, match=r"'x'.*region 'nope' is not registered"):
            await engine.infer(InferRequest(
                "m", {INPUT: TensorIn("FP32", (2, WIDTH), RegionRef("nope", 0, nbytes))}))
        with pytest.raises(InvalidArgument, match=r"'z'.*output_regions names an unknown"):
            await engine.infer(_request(_rows(1), output_regions={"z": RegionRef("r0", 0, 4)}))
        assert controls.snapshot()[0] == ran
        del memory
        await engine.unregister_region(None)
        assert await engine.region_status(None) == ()
    finally:
        shm.close()
        shm.unlink()


async def test_stats_are_a_snapshot_that_later_work_does_not_change(served):
    engine, _ = served
    await engine.infer(_request(_rows(3)))
    before = await engine.stats()
    (model,) = before.models
    assert (model.name, model.ready, model.healthy_workers, model.in_flight) == ("m", True, 2, 0)
    assert (model.counters.requests, model.counters.success) == (1, 1)
    assert sum(w.batches for w in model.workers) == 1
    assert sum(w.inferences for w in model.workers) == 3
    assert model.counters.success_histogram.count == 1
    await engine.infer(_request(_rows(2)))
    after = await engine.stats("m")
    assert after.models[0].counters.requests == 2
    # The first snapshot still says what was true when it was taken.
    assert model.counters.requests == 1 and model.counters.success_histogram.count == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.counters.requests = 5  # type: ignore[misc]
    with pytest.raises(NotFound):
        await engine.stats("nope")


async def test_stats_calls_that_overlap_share_one_snapshot(served):
    """A client calling Stats in a loop must not queue snapshots on the engine's loop
    (shared_calls.py); a call made after work is done still sees that work."""
    engine, _ = served
    snapshots = await asyncio.gather(*(engine.stats() for _ in range(50)))
    assert all(s is snapshots[0] for s in snapshots)
    await engine.infer(_request(_rows(1)))
    later = await engine.stats()
    assert later is not snapshots[0]
    assert later.models[0].counters.requests == snapshots[0].models[0].counters.requests + 1
    one, everything = await asyncio.gather(engine.stats("m"), engine.stats())
    assert one is not everything  # a model's and every model's are separate calls


async def test_health_listeners_hear_a_model_lose_its_last_worker(served):
    engine, controls = served
    heard: list[tuple[str, bool]] = []
    engine.add_health_listener(lambda name, serving: heard.append((name, serving)))
    controls.fail_next_builds(10**9)  # a worker that fails is not rebuilt
    for _ in range(2):
        controls.fail_next_batches(1)
        with pytest.raises(Exception, match="inference failed"):
            await engine.infer(_request(_rows(1)))
    assert heard == [("m", False)]
    assert not engine.ready("m") and not engine.ready()
    assert not engine.ready("nope")


async def test_the_byte_budget_is_held_behind_the_seam():
    repository = ModelRepository()
    await repository.add(ControlledBackend().runtime(controlled_model("m", max_batch_size=8)))
    budget = ByteBudget(limit_bytes=2 * 4 * WIDTH)
    engine = LocalEngine(repository, budget)
    try:
        await engine.infer(_request(_rows(2)))  # exactly the budget
        with pytest.raises(ResourceExhausted, match="larger than the server's whole budget"):
            await engine.infer(_request(_rows(3)))
        # A request that can never run is told so, not to retry.
        with pytest.raises(TensorError, match="dtype FP64"):
            await engine.infer(_request(_rows(3).astype(np.float64)))
        stats = await engine.stats()
        assert (stats.request_bytes.held_bytes, stats.request_bytes.refused) == (0, 1)
    finally:
        await repository.stop()


@pytest.mark.parametrize("system_regions", ["copy", "in_place"])
async def test_region_inputs_copied_into_the_server_count_against_the_byte_budget(
        monkeypatch, system_regions):
    """Copied (the default), a region's input is server memory like bytes off the wire:
    held in the budget, and refused before it is read. Read where it lies (in_place),
    it is the client's memory and is not counted."""
    from trtserve.service.config import SharedMemoryConfig
    from trtserve.service.engine.regions import RegionRegistry, SystemRegion

    reads: list[int] = []
    read_into = SystemRegion.read_into
    monkeypatch.setattr(SystemRegion, "read_into",
                        lambda self, ref, array: (reads.append(ref.byte_size),
                                                  read_into(self, ref, array)))
    repository = ModelRepository()
    await repository.add(ControlledBackend().runtime(controlled_model("m", max_batch_size=8)))
    engine = LocalEngine(repository, ByteBudget(limit_bytes=2 * 4 * WIDTH),
                         regions=RegionRegistry(SharedMemoryConfig(system_regions=system_regions)))
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        memory = np.frombuffer(shm.buf, dtype=np.float32)
        memory[:3 * WIDTH] = _rows(3).ravel()
        await engine.register_system_region("r", shm.name, 0, 4096)

        def request(rows: int) -> InferRequest:
            ref = RegionRef("r", 0, rows * 4 * WIDTH)
            return InferRequest("m", {INPUT: TensorIn("FP32", (rows, WIDTH), ref)})

        result = await engine.infer(request(2))  # exactly the budget
        np.testing.assert_array_equal(result.outputs[OUTPUT].data, expected(_rows(2)))
        if system_regions == "copy":
            with pytest.raises(ResourceExhausted, match="larger than the server's whole budget"):
                await engine.infer(request(3))
            assert reads == [2 * 4 * WIDTH]  # the refused one was never read
        else:
            result = await engine.infer(request(3))
            np.testing.assert_array_equal(result.outputs[OUTPUT].data, expected(_rows(3)))
        stats = await engine.stats()
        assert stats.request_bytes.held_bytes == 0
        del memory
        await engine.unregister_region("r")
    finally:
        await repository.stop()
        shm.close()
        shm.unlink()
