"""The engine's region registry on its own: real POSIX shared memory for system
regions, a host-memory double for CUDA IPC (no GPU here; named as a double).

System regions are read and written through the object's descriptor by default
(`system_regions = "copy"`), and mapped with `"in_place"` (IN_PLACE below)."""

from __future__ import annotations

import asyncio
import os
import threading
from multiprocessing import shared_memory

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.doubles.cuda_ipc import HostCudaIpc, RecordingPinner
from trtserve.service.config import SharedMemoryConfig
from trtserve.service.engine import regions
from trtserve.service.engine.api import RegionRef, TensorIn, TensorOut
from trtserve.service.engine.regions import (
    COPY_ON_LOOP_MAX_BYTES,
    RegionRegistry,
    SystemRegion,
    infer_with_regions,
)
from trtserve.service.errors import FailedPrecondition, InvalidArgument, ResourceExhausted


@pytest.fixture
def shm():
    block = shared_memory.SharedMemory(create=True, size=4096)
    yield block
    block.close()
    block.unlink()


IN_PLACE = SharedMemoryConfig(system_regions="in_place")


def _run(registry, inputs, outputs, compute):
    async def run(lease):
        await lease.read_inputs()
        return compute(lease.arrays)

    return asyncio.run(infer_with_regions(registry, inputs, outputs, run))


def test_inputs_are_copies_of_the_region_and_outputs_land_in_it(shm):
    registry = RegionRegistry()
    registry.register_system("r", shm.name, 0, 4096)
    memory = np.frombuffer(shm.buf, np.float32)
    memory[:4] = [1, 2, 3, 4]
    seen = {}

    def compute(arrays):
        seen["x"] = arrays["x"]
        return {"y": arrays["x"] * 10}

    answer = _run(registry, {"x": TensorIn("FP32", (2, 2), RegionRef("r", 0, 16))},
                  {"y": RegionRef("r", 1024, 64)}, compute)
    memory[0] = 7  # the client writes: the engine's copy does not change
    np.testing.assert_array_equal(seen["x"], [[1, 2], [3, 4]])
    assert answer["y"] == TensorOut("FP32", (2, 2), RegionRef("r", 1024, 16))
    np.testing.assert_array_equal(memory[256:260], [10, 20, 30, 40])
    usage = registry.usage()
    assert (usage.input_bytes, usage.output_bytes, usage.zero_copy_inputs,
            usage.host_copies) == (16, 16, 0, 0)
    del memory
    registry.close()


def test_an_object_shrunk_while_its_request_runs_fails_that_request_not_the_engine(shm):
    """The default's reason to be: with the object mapped, a read past its new end is
    SIGBUS, which kills the engine process. Through the descriptor it is a short read
    (INVALID_ARGUMENT for that request), and a write past it grows the client's object."""
    registry = RegionRegistry()
    registry.register_system("r", shm.name, 0, 4096)
    path = f"/dev/shm/{shm.name}"

    async def run() -> None:
        x = TensorIn("FP32", (16,), RegionRef("r", 0, 64))
        with registry.lease({"x": x}, {"y": RegionRef("r", 1024, 64)}) as lease:
            os.truncate(path, 8)  # the client, after the lease's checks, before the read
            with pytest.raises(InvalidArgument, match="'r': its object ended 8 bytes into "
                               "the 64 bytes at offset 0: the client shrank it"):
                await lease.read_inputs()
            answered = await lease.write_outputs({"y": np.arange(16, dtype=np.float32)})
        assert answered["y"] == TensorOut("FP32", (16,), RegionRef("r", 1024, 64))

    asyncio.run(run())
    assert os.stat(path).st_size == 1024 + 64
    with pytest.raises(InvalidArgument, match="holds 1088 bytes"):  # checked at the next one
        _run(registry, {"x": TensorIn("UINT8", (4,), RegionRef("r", 0, 4))}, {}, dict)
    registry.close()


@pytest.mark.parametrize("nbytes", [64, COPY_ON_LOOP_MAX_BYTES + 64])
def test_large_copies_leave_the_loop_and_hold_the_region_until_done(nbytes):
    """Small copies run on the loop, those past COPY_ON_LOOP_MAX_BYTES on a thread: both
    read and write exactly the bytes named."""
    block = shared_memory.SharedMemory(create=True, size=2 * nbytes)
    try:
        registry = RegionRegistry()
        registry.register_system("r", block.name, 0, 2 * nbytes)
        np.frombuffer(block.buf, np.uint8)[:nbytes] = np.arange(nbytes) % 251
        x = TensorIn("UINT8", (nbytes,), RegionRef("r", 0, nbytes))
        answer = _run(registry, {"x": x}, {"y": RegionRef("r", nbytes, nbytes)},
                      lambda arrays: {"y": arrays["x"] + 1})
        assert answer["y"] == TensorOut("UINT8", (nbytes,), RegionRef("r", nbytes, nbytes))
        np.testing.assert_array_equal(np.frombuffer(block.buf, np.uint8)[nbytes:],
                                      (np.arange(nbytes) % 251 + 1).astype(np.uint8))
        registry.close()
    finally:
        block.close()
        block.unlink()


def test_a_request_cancelled_during_a_copy_holds_its_region_until_the_copy_ends(
        shm, monkeypatch):
    """The thread keeps using the object's descriptor after its request is cancelled:
    unregister (which closes it) is refused until the copy ends."""
    registry = RegionRegistry()
    registry.register_system("r", shm.name, 0, 4096)
    started, finish = threading.Event(), threading.Event()
    read_into = SystemRegion.read_into

    def slow_read_into(self, ref, array):
        started.set()
        finish.wait(10)
        read_into(self, ref, array)

    monkeypatch.setattr(SystemRegion, "read_into", slow_read_into)
    monkeypatch.setattr(regions, "COPY_ON_LOOP_MAX_BYTES", 0)  # every copy on a thread

    async def run() -> None:
        with registry.lease({"x": TensorIn("UINT8", (4,), RegionRef("r", 0, 4))}, {}) as lease:
            reading = asyncio.ensure_future(lease.read_inputs())
            await asyncio.to_thread(started.wait, 10)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
        assert registry.status("r")[0].in_use == 1
        with pytest.raises(FailedPrecondition, match=r"'r' \(1\)"):
            registry.unregister("r")
        finish.set()
        for _ in range(1000):
            if registry.status("r")[0].in_use == 0:
                break
            await asyncio.sleep(0.01)
        registry.unregister("r")

    asyncio.run(run())


@pytest.mark.parametrize("config", [None, IN_PLACE], ids=["copy", "in_place"])
def test_for_a_device_model_a_copied_system_input_is_server_memory_not_zero_copy(
        shm, config):
    """A TensorRT model's request (device_io): its system-region input read through the
    descriptor is a copy held by the server (the byte budget counts it); mapped, it is
    read where it lies (zero copy, pinned)."""
    registry = RegionRegistry(config, pinner=RecordingPinner())
    registry.register_system("r", shm.name, 0, 4096)
    x = TensorIn("UINT8", (16,), RegionRef("r", 0, 16))
    with registry.lease({"x": x}, {}, device_io=True) as lease:
        copied = lease.copied_bytes
    assert (copied, registry.usage().zero_copy_inputs) == ((16, 0) if config is None
                                                           else (0, 1))
    registry.close()


def test_inputs_are_views_of_the_region_read_only_and_outputs_land_in_it(shm):
    registry = RegionRegistry(IN_PLACE)
    registry.register_system("r", shm.name, 0, 4096)
    memory = np.frombuffer(shm.buf, np.float32)
    memory[:4] = [1, 2, 3, 4]
    seen = {}

    def compute(arrays):
        seen["x"] = arrays["x"]
        return {"y": arrays["x"] * 10}

    answer = _run(registry, {"x": TensorIn("FP32", (2, 2), RegionRef("r", 0, 16))},
                  {"y": RegionRef("r", 1024, 64)}, compute)
    assert not seen["x"].flags.writeable
    memory[0] = 7  # the client writes: the view sees it (no copy was made)
    assert seen["x"][0, 0] == 7
    assert answer["y"] == TensorOut("FP32", (2, 2), RegionRef("r", 1024, 16))
    np.testing.assert_array_equal(memory[256:260], [10, 20, 30, 40])
    usage = registry.usage()
    assert (usage.input_bytes, usage.output_bytes, usage.zero_copy_inputs,
            usage.host_copies) == (16, 16, 1, 0)
    seen.clear()
    del memory
    registry.close()


def test_unaligned_offsets_of_object_and_reference(shm):
    # Registered 100 bytes into the object (not page-aligned), referenced 3 bytes in.
    registry = RegionRegistry()
    registry.register_system("r", "/" + shm.name, 100, 1000)
    np.frombuffer(shm.buf, np.uint8)[103:107] = [1, 2, 3, 4]
    answer = _run(registry, {"x": TensorIn("UINT8", (4,), RegionRef("r", 3, 4))}, {},
                  lambda arrays: {"y": arrays["x"].copy()})
    np.testing.assert_array_equal(answer["y"], [1, 2, 3, 4])
    registry.close()


def test_a_region_in_use_cannot_be_unregistered(shm):
    registry = RegionRegistry()
    registry.register_system("r", shm.name, 0, 4096)
    with registry.lease({"x": TensorIn("UINT8", (4,), RegionRef("r", 0, 4))}, {}):
        assert registry.status("r")[0].in_use == 1
        with pytest.raises(FailedPrecondition, match=r"'r' \(1\)"):
            registry.unregister("r")
        with pytest.raises(FailedPrecondition):
            registry.unregister(None)
    assert registry.status("r")[0].in_use == 0
    registry.unregister("r")
    assert registry.status(None) == ()


def test_a_zero_size_shape_numpy_cannot_hold_is_invalid_argument(shm):
    registry = RegionRegistry()
    registry.register_system("r", shm.name, 0, 4096)
    huge = TensorIn("FP32", (0, 2**62, 2**62), RegionRef("r", 0, 0))
    with pytest.raises(InvalidArgument, match=r"tensor 'x': shape \[0, 4611686018427387904, "
                       r"4611686018427387904\] is too large"), registry.lease({"x": huge}, {}):
        pass
    assert registry.status("r")[0].in_use == 0


def test_a_failed_request_releases_its_regions(shm):
    registry = RegionRegistry()
    registry.register_system("r", shm.name, 0, 4096)

    def fail(arrays):
        raise RuntimeError("backend failed")

    with pytest.raises(RuntimeError):
        _run(registry, {"x": TensorIn("UINT8", (4,), RegionRef("r", 0, 4))}, {}, fail)
    registry.unregister("r")


def test_unregister_while_a_view_is_alive_never_frees_it(shm):
    # A cancelled request's batch may still read its view: the mapping outlives it.
    registry = RegionRegistry(IN_PLACE)
    registry.register_system("r", shm.name, 0, 4096)
    np.frombuffer(shm.buf, np.uint8)[:4] = [9, 8, 7, 6]
    with registry.lease({"x": TensorIn("UINT8", (4,), RegionRef("r", 0, 4))}, {}) as lease:
        view = lease.arrays["x"]
    registry.unregister("r")
    np.testing.assert_array_equal(view, [9, 8, 7, 6])


def test_a_kept_lease_holds_its_regions_past_its_block_until_given_back(shm):
    """What a request cancelled while its batch runs relies on (Lease.keep): the regions
    stay in use after the request's block ends, until the batch gives them back, once."""
    registry = RegionRegistry()
    registry.register_system("r", shm.name, 0, 4096)
    x = TensorIn("UINT8", (4,), RegionRef("r", 0, 4))
    with registry.lease({"x": x}, {"y": RegionRef("r", 64, 4)}) as lease:
        give_back = lease.keep()
    (status,) = registry.status("r")
    assert status.in_use == 2
    with pytest.raises(FailedPrecondition, match=r"'r' \(2\)"):
        registry.unregister("r")
    give_back()
    give_back()  # a second call gives nothing back twice
    (status,) = registry.status("r")
    assert status.in_use == 0
    registry.unregister("r")
    assert registry.status(None) == ()


def test_limits_and_kinds():
    ipc = HostCudaIpc()
    registry = RegionRegistry(SharedMemoryConfig(max_regions=2, max_mapped_bytes=1000), ipc)
    handle, _ = ipc.export(600)
    registry.register_cuda("g", handle, 0, 600)
    with pytest.raises(ResourceExhausted, match="max_mapped_bytes = 1000"):
        registry.register_cuda("h", handle, 0, 600)
    registry.register_cuda("h", handle, 0, 400)
    with pytest.raises(ResourceExhausted, match="max_regions = 2"):
        registry.register_cuda("i", handle, 0, 1)
    with pytest.raises(FailedPrecondition, match="turned off"):
        RegionRegistry(SharedMemoryConfig(max_regions=0)).register_cuda("g", handle, 0, 1)
    # Unregistering the system kind leaves CUDA regions alone.
    registry.unregister(None, "system")
    assert [r.name for r in registry.status(None)] == ["g", "h"]
    registry.unregister(None, "cuda")
    assert ipc.calls.count("close") == 2 and not ipc.opened


def test_cuda_region_with_the_ipc_double():
    ipc = HostCudaIpc()
    registry = RegionRegistry(cuda=ipc)
    handle, device = ipc.export(64)
    device.view(np.float32)[:4] = [1, 2, 3, 4]
    registry.register_cuda("g", handle, 0, 64)
    [status] = registry.status("g", "cuda")
    assert (status.kind, status.device_id, status.byte_size) == ("cuda", 0, 64)
    answer = _run(registry, {"x": TensorIn("FP32", (4,), RegionRef("g", 0, 16))},
                  {"y": RegionRef("g", 32, 32)}, lambda arrays: {"y": arrays["x"] + 1})
    assert answer["y"] == TensorOut("FP32", (4,), RegionRef("g", 32, 16))
    np.testing.assert_array_equal(device.view(np.float32)[8:12], [2, 3, 4, 5])
    # The CPU backend copies both ways, and Stats say so.
    assert ipc.calls == ["open", "to_host", "to_device"]
    assert registry.usage().host_copies == 2 and registry.usage().zero_copy_inputs == 0


def test_cuda_handles_that_cannot_open_are_invalid_argument():
    registry = RegionRegistry(cuda=HostCudaIpc())
    with pytest.raises(InvalidArgument, match="cannot open the IPC handle on device 0: "
                       "cudaErrorInvalidResourceHandle"):
        registry.register_cuda("g", b"\x07" * 64, 0, 64)
    with pytest.raises(InvalidArgument, match="device id -1"):
        registry.register_cuda("g", b"\x07" * 64, -1, 64)
    assert registry.status(None) == ()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(-8, 4000), size_off_by=st.sampled_from([0, 0, 0, 1, -1, 8, 5000]),
       shape=st.lists(st.integers(0, 40), min_size=0, max_size=3),
       dtype=st.sampled_from(["UINT8", "FP32", "FP64", "INT16"]),
       output=st.booleans(), in_place=st.booleans())
def test_any_reference_is_read_exactly_or_refused(shm, offset, size_off_by, shape, dtype,
                                                  output, in_place):
    """Whatever a client names, the engine reads exactly those bytes or refuses with
    INVALID_ARGUMENT; it never reads outside the region or crashes."""
    itemsize = {"UINT8": 1, "FP32": 4, "FP64": 8, "INT16": 2}[dtype]
    byte_size = int(np.prod(shape)) * itemsize + size_off_by
    registry = RegionRegistry(IN_PLACE if in_place else None)
    registry.register_system("r", shm.name, 100, 3900)
    raw = np.frombuffer(shm.buf, np.uint8)
    raw[:] = np.arange(raw.size) % 251
    ref = RegionRef("r", offset, byte_size)
    inputs = {"x": TensorIn(dtype, tuple(shape), ref)}
    outputs = {"y": RegionRef("r", offset, byte_size)} if output else {}

    async def use() -> np.ndarray:
        with registry.lease(inputs, outputs) as lease:
            await lease.read_inputs()
            got = lease.arrays["x"]
            if output:
                await lease.write_outputs({"y": got.copy()})
            return got

    try:
        got = asyncio.run(use())
    except InvalidArgument as e:
        assert "region 'r'" in str(e) or "shared-memory byte size" in str(e)
    else:
        assert offset >= 0 and offset + byte_size <= 3900 and size_off_by == 0
        served.append(1)
        assert got.nbytes == byte_size and got.shape == tuple(shape)
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8),
                                      raw[100 + offset:100 + offset + byte_size])
    finally:
        del raw
        registry.close()


served: list[int] = []


def test_the_property_above_read_some_references():
    # Run after it (file order): some generated references were valid and read.
    assert served
