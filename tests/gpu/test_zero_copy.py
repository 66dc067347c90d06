"""A CUDA-region request to the TensorRT executor makes no host copy (issue 16, zero copy).

The GPU stand-in (a test double of a TensorRT engine doing real CUDA work) is served by
the real server; a client in another process (cudaIpcOpenMemHandle refuses a handle of
its own process) puts the input in a CUDA region and asks for the output in it. Checked:
the output region holds the stand-in's answer; the model's Stats count no host copy and
the copies avoided; and the executor's own cudaMemcpyAsync calls (counted by the
CudaRuntime every executor uses) show no host-to-device or device-to-host copy: none at
all when the request is bound by address (no CUDA graph), one device-to-device copy
each way with a graph bucket.

Skipped without an NVIDIA GPU, CuPy or cuda-python. Run: pytest -m gpu tests/gpu/test_zero_copy.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest

from trtserve.service.backends.tensorrt.api import gpu_present
from trtserve.service.backends.tensorrt.cuda import CudaRuntime, runtime_module
from trtserve.service.testing.servers import ROOT

pytestmark = pytest.mark.gpu

if not gpu_present():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)
cupy = pytest.importorskip("cupy")
try:
    runtime_module()
except RuntimeError as err:
    pytest.skip(str(err), allow_module_level=True)

from trtserve.client.client import Client  # noqa: E402
from trtserve.service.testing.gpu_standin import (  # noqa: E402
    StandinEngine,
    serving_standin,
    standin_config,
)

IN, HIDDEN, OUT, ROWS = 64, 128, 64, 3

# Runs in the client process: the input uploaded into a CUDA region, the output asked
# for in the same region, then read back from the device.
CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from trtserve.client import Client
    from trtserve.client.shared_memory import CudaRegion, RegionTensor

    url, rows, features, out_features, requests = (sys.argv[1], *map(int, sys.argv[2:6]))
    x = np.random.default_rng(0).standard_normal((rows, features)).astype(np.float32)
    out_bytes = rows * out_features * 4
    with Client(url) as c, CudaRegion(x.nbytes + out_bytes) as region:
        c.register_region(region)
        slot = region.upload(x)
        for _ in range(requests):
            c.infer("standin", {"input": RegionTensor(slot, "FP32", x.shape)},
                    output_regions={"output": region.slot(x.nbytes, out_bytes)})
        got = region.download(np.float32, (rows, out_features), x.nbytes)
        c.unregister_region(region)
    print(json.dumps({"x": x.tolist(), "y": got.tolist()}))
""")


@pytest.fixture(scope="module")
def engine() -> Iterator[StandinEngine]:
    standin = StandinEngine(in_features=IN, hidden=HIDDEN, out_features=OUT, batch=(1, 4, 8))
    yield standin
    standin.close()


def _serve_and_ask(engine: StandinEngine, cuda_graphs: bool, requests: int
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, int], object]:
    cuda = CudaRuntime(0)
    config = standin_config(workers=1, max_queue_delay_us=0, cuda_graphs=cuda_graphs,
                            inline_below_us=0)
    with serving_standin(engine, config, cuda=cuda) as server:
        before = dict(cuda.copies)
        done = subprocess.run([sys.executable, "-c", CLIENT, server.url, str(ROWS), str(IN),
                               str(OUT), str(requests)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        copies = {k: cuda.copies[k] - before.get(k, 0) for k in ("h2d", "d2h", "d2d")}
        with Client(server.url) as c:
            [model] = c.stats("standin").models
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return (np.array(report["x"], np.float32), np.array(report["y"], np.float32), copies,
            model)


def _close(engine: StandinEngine, x: np.ndarray, y: np.ndarray) -> None:
    ref = engine.reference(x)
    assert float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) < 1e-5


def test_a_lone_cuda_region_request_is_bound_with_no_copy_at_all(engine: StandinEngine) -> None:
    x, y, copies, model = _serve_and_ask(engine, cuda_graphs=False, requests=1)
    _close(engine, x, y)
    assert copies == {"h2d": 0, "d2h": 0, "d2d": 0}
    shm = model.shared_memory  # type: ignore[attr-defined]
    assert (shm.host_copies, shm.copies_avoided, shm.bound_batches) == (0, 2, 1)
    assert shm.input_bytes == ROWS * IN * 4 and shm.output_bytes == ROWS * OUT * 4


def test_with_a_graph_bucket_one_device_copy_each_way_and_no_host_copy(
        engine: StandinEngine) -> None:
    # The first request captures the bucket's graph of the engine's work alone (no copy
    # nodes); both requests copy their input in and their output out device-to-device.
    x, y, copies, model = _serve_and_ask(engine, cuda_graphs=True, requests=2)
    _close(engine, x, y)
    assert copies == {"h2d": 0, "d2h": 0, "d2d": 4}
    shm = model.shared_memory  # type: ignore[attr-defined]
    assert (shm.host_copies, shm.copies_avoided, shm.copied_batches) == (0, 4, 2)
    assert model.graph_launches == 2  # type: ignore[attr-defined]
