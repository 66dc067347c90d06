"""ONNX Runtime writing outputs into destinations it is given (a system region's range)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from trtserve.service.backends import onnxruntime
from trtserve.service.backends.base import HostTarget
from trtserve.service.backends.onnxruntime import IOBINDING_MIN_BYTES, OrtExecutor
from trtserve.service.config import ModelConfig, SharedMemoryConfig
from trtserve.service.engine.api import InferRequest, RegionRef, TensorIn
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.engine.regions import RegionRegistry
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.testing.onnx_models import offset_net

# Regions the executor reads and writes where they lie (the default copies through the
# object's descriptor, so an executor never sees one).
IN_PLACE = SharedMemoryConfig(system_regions="in_place")

FEATURES = 4


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return offset_net(tmp_path / "plus3.onnx", 3.0, FEATURES)


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def test_a_lone_request_with_a_large_output_is_written_by_onnx_runtime_into_its_target(
        tmp_path: Path) -> None:
    wide = IOBINDING_MIN_BYTES // (3 * 4) + 1  # 3 rows: just past the threshold
    ex = OrtExecutor(str(offset_net(tmp_path / "wide.onnx", 3.0, wide)), threads=1,
                     max_batch=8)
    x = np.random.default_rng(0).standard_normal((3, wide)).astype(np.float32)
    region = np.zeros(x.nbytes + 64, np.uint8)
    result = ex.run({"input": [x]}, 3, [{"output": HostTarget(region)}])
    placed = result.placed[(0, "output")]
    # Written by ONNX Runtime itself (IOBinding to the target's address): no copy.
    assert placed.ctypes.data == region.ctypes.data
    np.testing.assert_allclose(region[:x.nbytes].view(np.float32).reshape(3, wide), x + 3)
    assert (result.io_path, result.copies_avoided) == ("bound", 1)


def test_a_small_output_is_computed_as_usual_and_copied_into_its_target(model: Path) -> None:
    ex = OrtExecutor(str(model), threads=1, max_batch=8)
    x = _x(3)
    region = np.zeros(256, np.uint8)
    result = ex.run({"input": [x]}, 3, [{"output": HostTarget(region)}])
    assert np.shares_memory(result.placed[(0, "output")], region)
    np.testing.assert_allclose(region[:3 * FEATURES * 4].view(np.float32).reshape(3, FEATURES),
                               x + 3)
    assert (result.io_path, result.copies_avoided) == ("copied", 0)


def test_a_batch_of_several_copies_each_requests_rows_into_its_target(model: Path) -> None:
    ex = OrtExecutor(str(model), threads=1, max_batch=8)
    a, b, c = _x(2, 1), _x(1, 2), _x(3, 3)
    ra, rc = np.zeros(2 * FEATURES * 4, np.uint8), np.zeros(3 * FEATURES * 4, np.uint8)
    result = ex.run({"input": [a, b, c]}, 6,
                    [{"output": HostTarget(ra)}, {}, {"output": HostTarget(rc)}])
    np.testing.assert_allclose(ra.view(np.float32).reshape(2, FEATURES), a + 3)
    np.testing.assert_allclose(rc.view(np.float32).reshape(3, FEATURES), c + 3)
    np.testing.assert_allclose(result.outputs["output"][2:3], b + 3)
    assert set(result.placed) == {(0, "output"), (2, "output")}
    assert (result.io_path, result.copies_avoided) == ("copied", 0)


def test_a_target_too_small_is_left_to_the_caller(model: Path) -> None:
    ex = OrtExecutor(str(model), threads=1, max_batch=8)
    x = _x(4)
    small = np.zeros(8, np.uint8)
    result = ex.run({"input": [x]}, 4, [{"output": HostTarget(small)}])
    assert result.placed == {} and not small.any()
    np.testing.assert_allclose(result.outputs["output"], x + 3)


@pytest.fixture
async def engine(model: Path) -> AsyncIterator[tuple[LocalEngine, ModelRuntime]]:
    config = ModelConfig(name="m", path=str(model), workers=1, intra_op_threads=1,
                         max_queue_delay_us=0)
    runtime = ModelRuntime(config, onnxruntime.load(config))
    repository = ModelRepository()
    await repository.add(runtime)
    try:
        yield LocalEngine(repository, regions=RegionRegistry(IN_PLACE)), runtime
    finally:
        await repository.stop()


async def test_a_system_region_output_is_written_once_by_the_executor(engine) -> None:
    local, runtime = engine
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        floats = np.frombuffer(shm.buf, np.float32)
        x = _x(2, 4)
        floats[:2 * FEATURES] = x.ravel()
        await local.register_system_region("r", shm.name, 0, 4096)
        nbytes = 2 * FEATURES * 4
        result = await local.infer(InferRequest(
            "m", {"input": TensorIn("FP32", (2, FEATURES), RegionRef("r", 0, nbytes))},
            output_regions={"output": RegionRef("r", 1024, 1024)}))
        assert result.outputs["output"].data == RegionRef("r", 1024, nbytes)  # type: ignore[union-attr]
        np.testing.assert_allclose(floats[256:256 + 2 * FEATURES].reshape(2, FEATURES), x + 3)
        c = runtime.counters
        # The input was read where it lay (a copy avoided); the output is small, so
        # ONNX Runtime's executor copied it into the region itself, once.
        assert (c.shm_input_bytes, c.shm_output_bytes, c.copies_avoided, c.host_copies) == (
            nbytes, nbytes, 1, 0)
        assert c.io_paths == {"copied": 1}
        del floats
        await local.unregister_region("r")
    finally:
        shm.close()
        shm.unlink()


@pytest.fixture
def region_r() -> Iterator[tuple[RegionRegistry, shared_memory.SharedMemory]]:
    """A 4096-byte POSIX shared-memory block, registered as the system region 'r'."""
    shm = shared_memory.SharedMemory(create=True, size=4096)
    registry = RegionRegistry(IN_PLACE)
    try:
        registry.register_system("r", shm.name, 0, 4096)
        yield registry, shm
    finally:
        registry.close()
        shm.close()
        shm.unlink()


def test_a_lone_region_input_is_fed_to_onnx_runtime_as_the_regions_memory(
        model: Path, region_r: tuple[RegionRegistry, shared_memory.SharedMemory]) -> None:
    ex = OrtExecutor(str(model), threads=1, max_batch=8)
    registry, shm = region_r
    client_side = np.frombuffer(shm.buf, np.float32)
    x = _x(3)
    client_side[:x.size] = x.ravel()
    ref = TensorIn("FP32", x.shape, RegionRef("r", 0, x.nbytes))
    with registry.lease({"input": ref}, {}) as lease:
        view = lease.arrays["input"]
        # The region's memory itself, read-only: what the client writes, it shows.
        assert not view.flags.writeable
        client_side[0] += 1.0
        assert view[0, 0] == client_side[0]
        result = ex.run({"input": [view]}, 3)
        np.testing.assert_allclose(result.outputs["output"],
                                   client_side[:x.size].reshape(x.shape) + 3)
        # Read where it lay: a copy avoided, and no region tensor was copied.
        assert (result.io_path, result.copies_avoided) == ("bound", 1)
        del view
    del client_side


def test_region_inputs_in_a_batch_of_several_are_copied_once_each(
        model: Path, region_r: tuple[RegionRegistry, shared_memory.SharedMemory]) -> None:
    ex = OrtExecutor(str(model), threads=1, max_batch=8)
    registry, shm = region_r
    client_side = np.frombuffer(shm.buf, np.float32)
    a, b = _x(2, 1), _x(1, 2)
    client_side[:a.size] = a.ravel()
    client_side[256:256 + b.size] = b.ravel()
    refs = {"input": TensorIn("FP32", a.shape, RegionRef("r", 0, a.nbytes))}
    refs_b = {"input": TensorIn("FP32", b.shape, RegionRef("r", 1024, b.nbytes))}
    with registry.lease(refs, {}) as la, registry.lease(refs_b, {}) as lb:
        result = ex.run({"input": [la.arrays["input"], lb.arrays["input"]]}, 3)
    np.testing.assert_allclose(result.outputs["output"], np.concatenate([a, b]) + 3)
    # Gathered into the batch: one copy each, none avoided.
    assert (result.io_path, result.copies_avoided) == ("copied", 0)
    del client_side, la, lb


async def test_a_batch_of_two_region_requests_counts_its_gathering_copies(model: Path) -> None:
    # A batch forms only when full (two requests): the wait is far beyond the test.
    config = ModelConfig(name="m", path=str(model), workers=1, intra_op_threads=1,
                         max_batch_size=2, max_queue_delay_us=60_000_000)
    runtime = ModelRuntime(config, onnxruntime.load(config))
    repository = ModelRepository()
    await repository.add(runtime)
    local = LocalEngine(repository, regions=RegionRegistry(IN_PLACE))
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        floats = np.frombuffer(shm.buf, np.float32)
        x = _x(2, 5)
        floats[:x.size] = x.ravel()
        await local.register_system_region("r", shm.name, 0, 4096)
        one = InferRequest("m", {"input": TensorIn("FP32", (1, FEATURES),
                                                   RegionRef("r", 0, FEATURES * 4))})
        two = InferRequest("m", {"input": TensorIn("FP32", (1, FEATURES),
                                                   RegionRef("r", FEATURES * 4, FEATURES * 4))})
        first, second = await asyncio.wait_for(
            asyncio.gather(local.infer(one), local.infer(two)), 30)
        np.testing.assert_allclose(first.outputs["output"].data, x[:1] + 3)  # type: ignore[arg-type]
        np.testing.assert_allclose(second.outputs["output"].data, x[1:] + 3)  # type: ignore[arg-type]
        c = runtime.counters
        assert runtime.worker_stats[0].batches == 1
        assert (c.copies_avoided, c.host_copies, c.io_paths) == (0, 0, {"copied": 1})
        del floats
        await local.unregister_region("r")
    finally:
        await repository.stop()
        shm.close()
        shm.unlink()


@pytest.mark.parametrize("inline_below_us", [None, 0], ids=["on the loop", "on the thread"])
async def test_an_unregistered_region_is_unmapped_though_no_request_came_since(
        model: Path, inline_below_us: int | None) -> None:
    """The batcher's loop and the worker's thread each held their last batch until the
    next one came, and with it views of the region: an idle model kept a client's
    unregistered region mapped (and its descriptor open) indefinitely."""
    settings = {} if inline_below_us is None else {"inline_below_us": inline_below_us}
    config = ModelConfig(name="m", path=str(model), workers=2, intra_op_threads=1,
                         max_queue_delay_us=0, **settings)  # type: ignore[arg-type]
    runtime = ModelRuntime(config, onnxruntime.load(config))
    repository = ModelRepository()
    await repository.add(runtime)
    local = LocalEngine(repository, regions=RegionRegistry(IN_PLACE))
    shm = shared_memory.SharedMemory(create=True, size=4096)

    def server_maps() -> int:  # the client's own mapping (shm.buf) is one of them
        with open("/proc/self/maps") as maps:
            return sum(shm.name in line for line in maps) - 1

    try:
        await local.register_system_region("r", shm.name, 0, 4096)
        for _ in range(4):
            await local.infer(InferRequest(
                "m", {"input": TensorIn("FP32", (1, FEATURES), RegionRef("r", 0, 16))},
                output_regions={"output": RegionRef("r", 64, 64)}))
        assert server_maps() == 1
        await local.unregister_region("r")
        for _ in range(100):  # a worker thread drops its batch just after reporting it
            if server_maps() == 0:
                break
            await asyncio.sleep(0.01)
        assert server_maps() == 0
    finally:
        await repository.stop()
        shm.close()
        shm.unlink()
