"""benchmarks/grpc_floor.py --onnx: the lean server's answers are the model's own outputs.

Its latency is quoted as the least any grpc.aio server can spend on the model,
which holds only if it really runs the model on the request it was sent.
"""

import numpy as np
import onnxruntime as ort

from benchmarks.grpc_floor import run_model
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb


def test_the_lean_server_answers_with_what_the_model_computes(example_onnx):
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    request = pb.InferRequest(model="floor", id="r1")
    request.inputs.add(name="input", dtype=pb.DATA_TYPE_FP32, shape=x.shape, data=x.tobytes())

    answer = pb.InferResponse.FromString(run_model(str(example_onnx))(request.SerializeToString()))

    want = ort.InferenceSession(str(example_onnx)).run(None, {"input": x})[0]
    (output,) = answer.outputs
    assert answer.id == "r1" and output.name == "output" and list(output.shape) == [3, 16]
    got = np.frombuffer(output.data, np.float32).reshape(3, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
