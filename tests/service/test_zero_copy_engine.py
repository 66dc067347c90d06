"""Shared-memory requests through the engine to the TensorRT executor (doubles, no GPU).

The TensorRT executor runs against the recording doubles (service/testing/trt_double.py),
CUDA regions are opened with the CUDA IPC double, and system regions are pinned with a
recording double of cudaHostRegister: what is checked is which path each request took
(bound, copied), the copies the runtime double saw, and what Stats count.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np
import pytest

from tests.doubles.cuda_ipc import HostCudaIpc, RecordingPinner
from trtserve.service.backends.base import LoadedModel
from trtserve.service.backends.tensorrt.load import EngineHandle, engine_spec, executor_factories
from trtserve.service.config import ModelConfig, SharedMemoryConfig
from trtserve.service.engine.api import InferRequest, RegionRef, TensorIn
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.engine.regions import RegionRegistry
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import FailedPrecondition, InvalidArgument
from trtserve.service.testing.trt_double import HostCudaRuntime, RecordingEngine, trt_module

# System regions mapped and pinned, as `system_regions = "in_place"` serves them.
IN_PLACE = SharedMemoryConfig(system_regions="in_place")

FEATURES = 4
ROW_BYTES = FEATURES * 4


@dataclass
class Served:
    engine: LocalEngine
    runtime: ModelRuntime
    cuda: HostCudaRuntime
    ipc: HostCudaIpc
    pinner: RecordingPinner
    trt: RecordingEngine


async def _serve(pinner: RecordingPinner, graphs: bool = False,
                 delay_us: int = 0) -> AsyncIterator[Served]:
    cuda = HostCudaRuntime()
    trt = RecordingEngine(cuda, FEATURES, profiles=((1, 4, 8),))
    handle = EngineHandle(trt)  # type: ignore[arg-type]
    config = ModelConfig(name="m", path="m.engine", backend="tensorrt", workers=1,
                         max_queue_delay_us=delay_us, inline_below_us=0)
    buckets = (1, 2, 4, 8) if graphs else ()
    loaded = LoadedModel(engine_spec(trt, "m"),  # type: ignore[arg-type]
                         executor_factories(handle, cuda, 1, buckets, graphs, trt_module, "m"),
                         handle.close)
    runtime = ModelRuntime(config, loaded)
    repository = ModelRepository()
    await repository.add(runtime)
    ipc = HostCudaIpc()
    try:
        yield Served(LocalEngine(repository, regions=RegionRegistry(IN_PLACE, cuda=ipc,
                                                                  pinner=pinner)),
                     runtime, cuda, ipc, pinner, trt)
    finally:
        if trt.hold is not None:
            trt.hold.set()  # a test that failed holding a batch must not hang the stop
        await repository.stop()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async for s in _serve(RecordingPinner()):
        yield s


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


async def _cuda_region(s: Served, name: str, nbytes: int) -> np.ndarray:
    handle, memory = s.ipc.export(nbytes)
    await s.engine.register_cuda_region(name, handle, 0, nbytes)
    s.cuda.adopt(memory.ctypes.data, nbytes)
    return memory


async def test_a_cuda_region_request_makes_no_host_copy(served: Served) -> None:
    s = served
    memory = await _cuda_region(s, "g", 1024)
    x = _x(3)
    memory[:3 * ROW_BYTES] = x.view(np.uint8).ravel()
    before = dict(s.cuda.copies)
    result = await s.engine.infer(InferRequest(
        "m", {"x": TensorIn("FP32", (3, FEATURES), RegionRef("g", 0, 3 * ROW_BYTES))},
        output_regions={"y": RegionRef("g", 512, 512)}))
    assert result.outputs["y"].data == RegionRef("g", 512, 3 * ROW_BYTES)  # type: ignore[union-attr]
    np.testing.assert_array_equal(
        memory[512:512 + 3 * ROW_BYTES].view(np.float32).reshape(3, FEATURES), 2 * x + 1)
    # No copy by the executor (bound by address) nor by the registry (no to_host/to_device).
    assert s.cuda.copies == before
    assert s.ipc.calls == ["open"]
    counters = s.runtime.counters
    assert (counters.shm_input_bytes, counters.shm_output_bytes) == (3 * ROW_BYTES,
                                                                     3 * ROW_BYTES)
    assert (counters.copies_avoided, counters.host_copies) == (2, 0)
    assert counters.io_paths == {"bound": 1}
    stats = (await s.engine.stats()).models[0].counters
    assert (stats.copies_avoided, stats.host_copies, stats.shm_input_bytes) == (
        2, 0, 3 * ROW_BYTES)
    usage = (await s.engine.stats()).shared_memory
    assert (usage.host_copies, usage.zero_copy_inputs) == (0, 1)


async def test_a_cuda_region_request_with_a_graph_bucket_copies_device_to_device() -> None:
    async for s in _serve(RecordingPinner(), graphs=True):
        memory = await _cuda_region(s, "g", 1024)
        x = _x(3, seed=1)
        memory[:3 * ROW_BYTES] = x.view(np.uint8).ravel()
        request = InferRequest(
            "m", {"x": TensorIn("FP32", (3, FEATURES), RegionRef("g", 0, 3 * ROW_BYTES))},
            output_regions={"y": RegionRef("g", 512, 512)})
        await s.engine.infer(request)  # captures the bucket's graphs
        before = dict(s.cuda.copies)
        await s.engine.infer(request)
        moved = {k: s.cuda.copies[k] - before[k] for k in before}
        assert moved == {"h2d": 0, "d2h": 0, "d2d": 2}
        assert s.runtime.counters.io_paths == {"copied": 2}
        assert s.runtime.counters.host_copies == 0
        np.testing.assert_array_equal(
            memory[512:512 + 3 * ROW_BYTES].view(np.float32).reshape(3, FEATURES), 2 * x + 1)


async def test_system_regions_are_pinned_once_and_unpinned_before_unmapping(
        served: Served) -> None:
    s = served
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        floats = np.frombuffer(shm.buf, np.float32)
        x = _x(2, seed=2)
        floats[:2 * FEATURES] = x.ravel()
        await s.engine.register_system_region("r", shm.name, 0, 4096)
        assert s.pinner.calls == []  # pinned on first use by a TensorRT model
        for _ in range(2):
            await s.engine.infer(InferRequest(
                "m", {"x": TensorIn("FP32", (2, FEATURES), RegionRef("r", 0, 2 * ROW_BYTES))},
                output_regions={"y": RegionRef("r", 1024, 1024)}))
        assert s.pinner.calls == ["register"] and list(s.pinner.pinned.values()) == [4096]
        np.testing.assert_array_equal(floats[256:256 + 2 * FEATURES].reshape(2, FEATURES),
                                      2 * x + 1)
        assert s.runtime.counters.host_copies == 0
        assert s.runtime.counters.copies_avoided == 4  # input H2D and output D2H, twice
        del floats
        await s.engine.unregister_region("r")
        assert s.pinner.calls == ["register", "unregister"] and s.pinner.pinned == {}
    finally:
        shm.close()
        shm.unlink()


async def test_a_refused_pin_falls_back_to_pageable_copies_with_one_log_line(
        caplog: pytest.LogCaptureFixture) -> None:
    async for s in _serve(RecordingPinner(refuse="cudaErrorHostMemoryAlreadyRegistered")):
        shm = shared_memory.SharedMemory(create=True, size=4096)
        try:
            floats = np.frombuffer(shm.buf, np.float32)
            x = _x(1, seed=3)
            floats[:FEATURES] = x.ravel()
            await s.engine.register_system_region("r", shm.name, 0, 4096)
            for _ in range(3):
                await s.engine.infer(InferRequest(
                    "m", {"x": TensorIn("FP32", (1, FEATURES), RegionRef("r", 0, ROW_BYTES))},
                    output_regions={"y": RegionRef("r", 1024, ROW_BYTES)}))
            np.testing.assert_array_equal(floats[256:256 + FEATURES], (2 * x + 1).ravel())
            refusals = [r for r in caplog.records if "cudaHostRegister" in r.getMessage()]
            assert len(refusals) == 1
            assert "cudaErrorHostMemoryAlreadyRegistered" in refusals[0].getMessage()
            assert s.pinner.calls == ["register"]
            del floats
            await s.engine.unregister_region("r")
            assert s.pinner.calls == ["register"]  # nothing to unregister
        finally:
            shm.close()
            shm.unlink()


async def test_an_output_region_too_small_is_refused_before_any_work(served: Served) -> None:
    s = served
    memory = await _cuda_region(s, "g", 1024)
    before = dict(s.cuda.copies)
    with pytest.raises(InvalidArgument) as refused:
        await s.engine.infer(InferRequest(
            "m", {"x": TensorIn("FP32", (4, FEATURES), RegionRef("g", 0, 4 * ROW_BYTES))},
            output_regions={"y": RegionRef("g", 512, 4 * ROW_BYTES - 4)}))
    message = str(refused.value)
    assert "output 'y'" in message and "region 'g'" in message
    assert f"needs {4 * ROW_BYTES} bytes" in message and f"{4 * ROW_BYTES - 4} bytes" in message
    assert s.runtime.counters.requests == 0 and s.cuda.copies == before
    assert not memory[512:].any()


async def test_a_region_a_batch_writes_into_cannot_be_unregistered() -> None:
    # A long queue delay holds the request in the batcher while unregister is tried
    # (it is refused while the request runs as well: the lease spans both).
    async for s in _serve(RecordingPinner(), delay_us=200_000):
        await _cuda_region(s, "g", 1024)
        task = asyncio.ensure_future(s.engine.infer(InferRequest(
            "m", {"x": TensorIn("FP32", (1, FEATURES), RegionRef("g", 0, ROW_BYTES))},
            output_regions={"y": RegionRef("g", 512, ROW_BYTES)})))
        await asyncio.sleep(0)
        while s.runtime.counters.requests == 0:
            await asyncio.sleep(0.001)
        with pytest.raises(FailedPrecondition, match=r"in use by requests not yet answered.*: 'g'"):
            await s.engine.unregister_region("g")
        await task
        await s.engine.unregister_region("g")
        assert s.ipc.calls == ["open", "close"]


async def test_prometheus_exports_the_models_shared_memory_counters(served: Served) -> None:
    from trtserve.service.metrics import families

    s = served
    memory = await _cuda_region(s, "g", 1024)
    memory[:ROW_BYTES] = _x(1).view(np.uint8).ravel()
    await s.engine.infer(InferRequest(
        "m", {"x": TensorIn("FP32", (1, FEATURES), RegionRef("g", 0, ROW_BYTES))},
        output_regions={"y": RegionRef("g", 512, ROW_BYTES)}))
    stats = await s.engine.stats()
    found = families(stats, {"m": s.engine.describe("m")})
    samples = {(m.name, tuple(sorted(m.labels.items()))): m.value
               for family in found for m in family.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(f"trtserve_{name}", tuple(sorted({"model": "m", **labels}.items())))]

    assert value("model_shared_memory_bytes_total", direction="input") == ROW_BYTES
    assert value("model_shared_memory_bytes_total", direction="output") == ROW_BYTES
    assert value("model_shared_memory_copies_avoided_total") == 2
    assert value("model_shared_memory_host_copies_total") == 0
    assert value("model_shared_memory_batches_total", path="bound") == 1
    assert value("model_shared_memory_batches_total", path="copied") == 0


# --- a request cancelled while its batch runs on the device ------------------------------


async def _held_on_device(s: Served, request: InferRequest) -> asyncio.Future[object]:
    """Start `request` with the engine double's kernels held: once this returns its
    batch is on the "device", reading its input and about to write its output."""
    s.trt.hold = threading.Event()
    task = asyncio.ensure_future(s.engine.infer(request))
    while not s.trt.held.is_set():
        await asyncio.sleep(0.001)
    return task


async def _batch_done(s: Served) -> None:
    while s.runtime.in_flight:
        await asyncio.sleep(0.001)


async def _cancelled_at_once(task: asyncio.Future[object]) -> None:
    """The caller's answer does not wait for the batch (which is still held)."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_request_cancelled_while_its_batch_runs_keeps_its_bytes_in_the_budget(
        served: Served) -> None:
    s = served
    x = _x(2, seed=7)
    task = await _held_on_device(s, InferRequest("m", {"x": TensorIn("FP32", (2, FEATURES), x)}))
    await _cancelled_at_once(task)
    # The batch still holds the request's input: its bytes are still in memory, so
    # still counted against max_request_bytes_in_flight.
    assert (await s.engine.stats()).request_bytes.held_bytes == x.nbytes
    assert s.trt.hold is not None
    s.trt.hold.set()
    await _batch_done(s)
    for _ in range(1000):
        if (await s.engine.stats()).request_bytes.held_bytes == 0:
            break
        await asyncio.sleep(0.001)
    assert (await s.engine.stats()).request_bytes.held_bytes == 0


async def test_a_cuda_region_is_not_closed_under_the_batch_of_a_cancelled_request(
        served: Served) -> None:
    s = served
    memory = await _cuda_region(s, "g", 1024)
    x = _x(2, seed=4)
    memory[:2 * ROW_BYTES] = x.view(np.uint8).ravel()
    task = await _held_on_device(s, InferRequest(
        "m", {"x": TensorIn("FP32", (2, FEATURES), RegionRef("g", 0, 2 * ROW_BYTES))},
        output_regions={"y": RegionRef("g", 512, 512)}))
    await _cancelled_at_once(task)
    assert s.runtime.counters.cancelled == 1
    # The executor still reads x and writes y by address in the region: its IPC
    # handle must stay open, so unregister is refused, as for any region in use.
    with pytest.raises(FailedPrecondition, match=r"batch of a request cancelled.*'g' \(2\)"):
        await s.engine.unregister_region("g")
    (status,) = await s.engine.region_status("g")
    assert status.in_use == 2 and s.ipc.calls == ["open"]  # its input and its output
    assert s.trt.hold is not None
    s.trt.hold.set()
    await _batch_done(s)
    # The batch wrote into the region after its request was cancelled: memory that
    # had to stay open until here.
    np.testing.assert_array_equal(
        memory[512:512 + 2 * ROW_BYTES].view(np.float32).reshape(2, FEATURES), 2 * x + 1)
    assert s.ipc.calls == ["open"]  # nothing closed until unregistered
    await s.engine.unregister_region("g")
    assert s.ipc.calls == ["open", "close"] and s.ipc.opened == {}
    assert s.trt.violations == []


async def test_a_system_region_is_not_unpinned_under_the_batch_of_a_cancelled_request(
        served: Served) -> None:
    s = served
    shm = shared_memory.SharedMemory(create=True, size=4096)
    try:
        await s.engine.register_system_region("r", shm.name, 0, 4096)
        task = await _held_on_device(s, InferRequest(
            "m", {"x": TensorIn("FP32", (1, FEATURES), RegionRef("r", 0, ROW_BYTES))},
            output_regions={"y": RegionRef("r", 1024, ROW_BYTES)}))
        await _cancelled_at_once(task)
        for name in ("r", ""):  # by name, and every region at once
            with pytest.raises(FailedPrecondition, match=r"'r' \(2\)"):
                await s.engine.unregister_region(name)
        assert s.pinner.calls == ["register"]  # cudaHostUnregister not called under it
        assert s.trt.hold is not None
        s.trt.hold.set()
        await _batch_done(s)
        assert s.pinner.calls == ["register"]
        await s.engine.unregister_region("r")
        assert s.pinner.calls == ["register", "unregister"] and s.pinner.pinned == {}
    finally:
        shm.close()
        shm.unlink()


async def test_a_request_cancelled_in_the_queue_frees_its_region_at_once(
        served: Served) -> None:
    """Only a batch on the device holds a cancelled request's region: one still queued
    (behind it, on the one worker) never runs, and its region is free at once."""
    s = served
    await _cuda_region(s, "running", 1024)
    await _cuda_region(s, "queued", 1024)
    running = await _held_on_device(s, InferRequest(
        "m", {"x": TensorIn("FP32", (1, FEATURES), RegionRef("running", 0, ROW_BYTES))}))
    queued = asyncio.ensure_future(s.engine.infer(InferRequest(
        "m", {"x": TensorIn("FP32", (1, FEATURES), RegionRef("queued", 0, ROW_BYTES))})))
    while s.runtime.counters.requests < 2:
        await asyncio.sleep(0.001)
    await _cancelled_at_once(queued)
    await s.engine.unregister_region("queued")
    assert s.trt.hold is not None
    s.trt.hold.set()
    await running  # the batch still running is answered as usual
    await s.engine.unregister_region("running")
    assert s.ipc.opened == {}
