"""The TensorRT executor with tensors in shared memory: device inputs, output targets.

Against the recording doubles (service/testing/trt_double.py): "device" memory is host
memory there, so a CUDA region is a host buffer the runtime double adopts, and the
log shows which copies and which `set_tensor_address` calls each batch made.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from trtserve.service.backends.base import DeviceTarget, HostTarget, PinnedHostArray, device_tensor
from trtserve.service.backends.tensorrt.executor import TrtExecutor
from trtserve.service.backends.tensorrt.load import graph_buckets
from trtserve.service.testing.trt_double import Call, HostCudaRuntime, RecordingEngine, trt_module

FEATURES = 4


@pytest.fixture
def cuda() -> HostCudaRuntime:
    return HostCudaRuntime()


@pytest.fixture
def engine(cuda: HostCudaRuntime) -> RecordingEngine:
    return RecordingEngine(cuda, FEATURES, profiles=((1, 4, 8),))


def make(engine: RecordingEngine, cuda: HostCudaRuntime, graphs: bool) -> TrtExecutor:
    return TrtExecutor(engine, cuda, trt_module=trt_module,  # type: ignore[arg-type]
                       graph_batch_sizes=graph_buckets((), 8), cuda_graphs=graphs)


@pytest.fixture
def plain(engine: RecordingEngine, cuda: HostCudaRuntime) -> Iterator[TrtExecutor]:
    ex = make(engine, cuda, graphs=False)
    yield ex
    ex.close()


@pytest.fixture
def graphed(engine: RecordingEngine, cuda: HostCudaRuntime) -> Iterator[TrtExecutor]:
    ex = make(engine, cuda, graphs=True)
    yield ex
    ex.close()


class Region:
    """A "CUDA region" for the doubles: a host buffer the runtime double may copy to."""

    def __init__(self, cuda: HostCudaRuntime, nbytes: int) -> None:
        self.memory = np.zeros(nbytes, np.uint8)
        self.pointer = self.memory.ctypes.data
        cuda.adopt(self.pointer, nbytes)

    def floats(self, offset: int, rows: int) -> np.ndarray:
        return self.memory[offset:offset + rows * FEATURES * 4].view(np.float32).reshape(
            rows, FEATURES)


def rows_of(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def copies(log: list[Call], since: int) -> list[str]:
    return [c.method for c in log[since:] if c.method.startswith("memcpy")]


def addresses(log: list[Call], since: int) -> list[tuple[str, int]]:
    return [(c.args[0], c.args[1]) for c in log[since:] if c.method == "set_tensor_address"]


def test_a_lone_request_on_a_cuda_region_is_bound_with_no_copy(plain: TrtExecutor,
                                                               cuda: HostCudaRuntime) -> None:
    region = Region(cuda, 1024)
    x = rows_of(3)
    region.floats(0, 3)[:] = x
    x_in = device_tensor(region.pointer, 0, np.dtype(np.float32), (3, FEATURES))
    target = DeviceTarget(region.pointer + 512, 512, 0)
    since = len(cuda.log)
    result = plain.run({"x": [x_in]}, 3, [{"y": target}])
    assert copies(cuda.log, since) == []
    bound = addresses(cuda.log, since)
    assert bound[:2] == [("x", region.pointer), ("y", region.pointer + 512)]
    # Back to the worker's own buffers for the next batch.
    assert [name for name, _ in bound[2:]] == ["x", "y"]
    assert region.pointer not in {ptr for _, ptr in bound[2:]}
    np.testing.assert_array_equal(region.floats(512, 3), 2 * x + 1)
    assert result.io_path == "bound" and result.copies_avoided == 2
    placed = result.placed[(0, "y")]
    assert placed.shape == (3, FEATURES) and placed.pointer == region.pointer + 512  # type: ignore[attr-defined]
    # The next batch, from host memory, runs on the worker's buffers as before.
    y = rows_of(2, seed=1)
    np.testing.assert_array_equal(plain.run({"x": [y]}, 2).outputs["y"], 2 * y + 1)


def test_a_lone_request_with_a_graph_bucket_copies_once_device_to_device(
        graphed: TrtExecutor, cuda: HostCudaRuntime) -> None:
    region = Region(cuda, 1024)
    x = rows_of(3, seed=2)
    region.floats(0, 3)[:] = x
    x_in = device_tensor(region.pointer, 0, np.dtype(np.float32), (3, FEATURES))
    target = DeviceTarget(region.pointer + 512, 512, 0)
    graphed.run({"x": [x_in]}, 3, [{"y": target}])  # captures the bucket's graphs
    region.memory[512:] = 0
    since = len(cuda.log)
    result = graphed.run({"x": [x_in]}, 3, [{"y": target}])
    assert copies(cuda.log, since) == ["memcpy_d2d_async", "memcpy_d2d_async"]
    assert addresses(cuda.log, since) == []
    assert result.graph_launch and result.io_path == "copied"
    np.testing.assert_array_equal(region.floats(512, 3), 2 * x + 1)


def test_a_batch_of_several_gathers_device_and_host_parts(plain: TrtExecutor,
                                                          cuda: HostCudaRuntime) -> None:
    region = Region(cuda, 1024)
    a, b = rows_of(2, seed=3), rows_of(3, seed=4)
    region.floats(0, 2)[:] = a
    a_in = device_tensor(region.pointer, 0, np.dtype(np.float32), (2, FEATURES))
    host_out = np.zeros(256, np.uint8)
    since = len(cuda.log)
    result = plain.run({"x": [a_in, b]}, 5,
                       [{"y": DeviceTarget(region.pointer + 512, 512, 0)},
                        {"y": HostTarget(host_out)}])
    assert addresses(cuda.log, since) == []  # several requests: never bound
    assert copies(cuda.log, since) == ["memcpy_d2d_async", "memcpy_h2d_async",
                                       "memcpy_d2d_async", "memcpy_d2h_async"]
    np.testing.assert_array_equal(region.floats(512, 2), 2 * a + 1)
    host = host_out[:3 * FEATURES * 4].view(np.float32).reshape(3, FEATURES)
    np.testing.assert_array_equal(host, 2 * b + 1)
    assert np.shares_memory(result.placed[(1, "y")], host_out)


@pytest.mark.parametrize("pinned", [True, False])
def test_host_targets_get_the_output_straight_from_the_device(plain: TrtExecutor,
                                                              cuda: HostCudaRuntime,
                                                              pinned: bool) -> None:
    x = rows_of(4, seed=5)
    out = np.zeros(4 * FEATURES * 4, np.uint8)
    staging = [b for b in cuda.host_buffers.values() if b.nbytes >= x.nbytes]
    for buffer in staging:
        buffer[:] = 0
    since = len(cuda.log)
    given = x.view(PinnedHostArray) if pinned else x
    result = plain.run({"x": [given]}, 4, [{"y": HostTarget(out, pinned=pinned)}])
    # One H2D, one D2H straight into the target.
    assert copies(cuda.log, since) == ["memcpy_h2d_async", "memcpy_d2h_async"]
    d2h = [c for c in cuda.log[since:] if c.method == "memcpy_d2h_async"]
    assert d2h[0].args[1] == 4 * FEATURES * 4
    np.testing.assert_array_equal(out.view(np.float32).reshape(4, FEATURES), 2 * x + 1)
    assert np.shares_memory(result.placed[(0, "y")], out)
    # Pinned memory: the input is DMA'd from where it lies, the staging buffers stay
    # untouched; pageable: the input is staged, as on the plain path.
    assert result.copies_avoided == (2 if pinned else 0)
    assert any(b.any() for b in staging) != pinned


def test_a_target_too_small_is_left_to_the_caller(plain: TrtExecutor,
                                                  cuda: HostCudaRuntime) -> None:
    x = rows_of(4, seed=6)
    small = np.zeros(16, np.uint8)
    result = plain.run({"x": [x]}, 4, [{"y": HostTarget(small)}])
    assert result.placed == {} and not small.any()
    np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)


def test_a_lone_request_in_pinned_memory_is_copied_to_the_device_from_where_it_lies(
        plain: TrtExecutor, cuda: HostCudaRuntime) -> None:
    from trtserve.service.backends.base import PinnedHostArray

    x = rows_of(2, seed=7)
    pinned = x.view(PinnedHostArray)
    plain.direct_min_bytes = x.nbytes  # as large as the executor copies directly
    since = len(cuda.log)
    result = plain.run({"x": [pinned]}, 2)
    h2d = [c for c in cuda.log[since:] if c.method == "memcpy_h2d_async"]
    assert len(h2d) == 1 and result.copies_avoided == 1 and result.io_path == "copied"
    np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)


def test_a_small_lone_request_in_pinned_memory_is_staged_like_any_batch(
        plain: TrtExecutor, cuda: HostCudaRuntime) -> None:
    """Below direct_min_bytes the staging copy costs less than the direct path's extra
    CUDA calls: the batch is gathered into the staging buffer and copied from there."""
    from trtserve.service.backends.base import PinnedHostArray

    x = rows_of(2, seed=8)
    plain.direct_min_bytes = x.nbytes + 1
    staging = [b for b in cuda.host_buffers.values() if b.nbytes >= x.nbytes]
    for buffer in staging:
        buffer[:] = 0
    result = plain.run({"x": [x.view(PinnedHostArray)]}, 2)
    assert result.copies_avoided == 0 and any(b.any() for b in staging)
    np.testing.assert_array_equal(result.outputs["y"], 2 * x + 1)
