"""CUDA shared-memory regions from a separate client process (CUDA IPC handles), served
by the CPU backend, checked against numpy; and tritonclient's cuda_shared_memory.

The client must be another process: cudaIpcOpenMemHandle refuses a handle of its own
process. Skipped without an NVIDIA GPU and cuda-python. Run: pytest -m gpu
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from trtserve.service.backends.tensorrt.api import gpu_present
from trtserve.service.backends.tensorrt.cuda import runtime_module
from trtserve.service.config import ModelConfig
from trtserve.service.testing.servers import ROOT, running_server, server_config

pytestmark = pytest.mark.gpu

if not gpu_present():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)
try:
    runtime_module()
except RuntimeError as err:
    pytest.skip(str(err), allow_module_level=True)

# Runs in the client process: our client with a CudaRegion, then tritonclient's utilities.
CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from trtserve.client import Client
    from trtserve.client.shared_memory import CudaRegion, RegionTensor

    url, model_path = sys.argv[1], sys.argv[2]
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    expected = session.run(None, {"input": x})[0]
    report = {}
    with Client(url) as c, CudaRegion(x.nbytes + expected.nbytes) as region:
        c.register_region(region)
        slot = region.upload(x)
        out = c.infer("example", {"input": RegionTensor(slot, "FP32", x.shape)},
                      output_regions={"output": region.slot(x.nbytes, expected.nbytes)})
        report["ours"] = float(np.abs(out["output"] - expected).max())
        report["stats"] = {"host_copies": c.stats().shared_memory.host_copies,
                           "input_bytes": c.stats().shared_memory.input_bytes}
        c.unregister_region(region)

    import tritonclient.grpc as triton
    import tritonclient.utils.cuda_shared_memory as cudashm
    tc = triton.InferenceServerClient(url)
    handle = cudashm.create_shared_memory_region("tc", x.nbytes + expected.nbytes, 0)
    cudashm.set_shared_memory_region(handle, [x])
    tc.register_cuda_shared_memory("tc", cudashm.get_raw_handle(handle), 0,
                                   x.nbytes + expected.nbytes)
    i = triton.InferInput("input", list(x.shape), "FP32")
    i.set_shared_memory("tc", x.nbytes)
    o = triton.InferRequestedOutput("output")
    o.set_shared_memory("tc", expected.nbytes, offset=x.nbytes)
    tc.infer("example", [i], outputs=[o])
    # The whole region as bytes (get_contents_as_numpy takes no offset in every
    # tritonclient release), then the output's part of it.
    whole = cudashm.get_contents_as_numpy(handle, np.uint8, [x.nbytes + expected.nbytes])
    got = whole[x.nbytes:].view(np.float32).reshape(expected.shape)
    report["tritonclient"] = float(np.abs(got - expected).max())
    report["status"] = tc.get_cuda_shared_memory_status(as_json=True)
    tc.unregister_cuda_shared_memory("tc")
    cudashm.destroy_shared_memory_region(handle)
    print(json.dumps(report))
""")


def test_cuda_regions_from_another_process(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1))
    with running_server(config) as server:
        done = subprocess.run([sys.executable, "-c", CLIENT, server.url, str(example_onnx)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["ours"] < 1e-5 and report["tritonclient"] < 1e-5
    # The CPU backend copies a CUDA region's input down and its output up: two copies.
    assert report["stats"] == {"host_copies": 2, "input_bytes": 4 * 64 * 4}
    assert report["status"]["regions"]["tc"].get("device_id", "0") in ("0", 0)
