"""CUDA shared-memory regions over KServe's HTTP/REST API, from a separate client
process (CUDA IPC handles): tritonclient.http with tritonclient.utils.cuda_shared_memory,
served by the CPU backend, checked against ONNX Runtime. The gRPC form:
test_cuda_regions.py.

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
from trtserve.service.testing.servers import ROOT, free_port, running_server, server_config

pytestmark = pytest.mark.gpu

if not gpu_present():
    pytest.skip("needs an NVIDIA GPU", allow_module_level=True)
try:
    runtime_module()
except RuntimeError as err:
    pytest.skip(str(err), allow_module_level=True)
# tritonclient's HTTP client needs its `http` extra (geventhttpclient).
pytest.importorskip("tritonclient.http", reason="tritonclient[http] is not installed")

# Runs in the client process, as a Triton user's HTTP client would.
CLIENT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    import tritonclient.http as httpclient
    import tritonclient.utils.cuda_shared_memory as cudashm

    url, model_path = sys.argv[1], sys.argv[2]
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    expected = session.run(None, {"input": x})[0]
    size = x.nbytes + expected.nbytes
    report = {}
    tc = httpclient.InferenceServerClient(url)
    handle = cudashm.create_shared_memory_region("tc", size, 0)
    cudashm.set_shared_memory_region(handle, [x])
    tc.register_cuda_shared_memory("tc", cudashm.get_raw_handle(handle), 0, size)
    i = httpclient.InferInput("input", list(x.shape), "FP32")
    i.set_shared_memory("tc", x.nbytes)
    o = httpclient.InferRequestedOutput("output")
    o.set_shared_memory("tc", expected.nbytes, offset=x.nbytes)
    result = tc.infer("example", [i], outputs=[o])
    report["described"] = result.get_response()["outputs"][0]
    whole = cudashm.get_contents_as_numpy(handle, np.uint8, [size])
    got = whole[x.nbytes:].view(np.float32).reshape(expected.shape)
    report["tritonclient"] = float(np.abs(got - expected).max())
    report["status"] = tc.get_cuda_shared_memory_status()
    tc.unregister_cuda_shared_memory("tc")
    report["after"] = tc.get_cuda_shared_memory_status()
    cudashm.destroy_shared_memory_region(handle)
    tc.close()
    print(json.dumps(report))
""")


def test_cuda_regions_over_http_from_another_process(example_onnx):
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1),
                           http_port=free_port())
    with running_server(config) as server:
        url = f"127.0.0.1:{server.server.http_port}"
        done = subprocess.run([sys.executable, "-c", CLIENT, url, str(example_onnx)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tritonclient"] < 1e-5
    assert "data" not in report["described"]
    assert "parameters" not in report["described"]
    size = 4 * 64 * 4 + 4 * 16 * 4  # the input and the output, one after the other
    assert report["status"] == [{"name": "tc", "device_id": 0, "byte_size": size}]
    assert report["after"] == []
