"""Serve an ONNX model with PyTriton (Triton's server + a Python model), for comparison.

Runs in PyTriton's own virtual environment, not in trtserve's: it imports only
numpy, onnxruntime and pytriton. Each Triton model instance owns one ONNX
Runtime session with the same thread settings trtserve gives its workers, and
Triton's dynamic batcher forms the batches.

    LD_LIBRARY_PATH=/root/.pyenv/versions/3.12.1/lib \\
    /tmp/pytriton-venv/bin/python benchmarks/pytriton_server.py MODEL.onnx \\
        --name heavy --grpc-port 8101 --instances 2 --max-batch-size 64 \\
        --max-queue-delay-us 500

PyTriton copies the Python-backend stub matching the interpreter that runs
this script (python_backend_stubs/<major.minor>), and that stub links
libpython<major.minor>.so, so the interpreter's lib folder must be on
LD_LIBRARY_PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import threading

import numpy as np
import onnxruntime as ort
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32,
    "tensor(int64)": np.int64, "tensor(bool)": np.bool_,
}


def session(path: str, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def infer_function(path: str, threads: int):
    sess = session(path, threads)
    outputs = [o.name for o in sess.get_outputs()]

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        values = sess.run(outputs, inputs)
        return dict(zip(outputs, values, strict=True))

    return infer


def tensors(nodes: list[ort.NodeArg]) -> list[Tensor]:
    # PyTriton shapes leave out the batch dimension.
    return [Tensor(name=n.name, dtype=_NUMPY[n.type],
                   shape=tuple(d if isinstance(d, int) else -1 for d in n.shape[1:]))
            for n in nodes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="ONNX file with a dynamic first (batch) dimension")
    parser.add_argument("--name", default="model")
    parser.add_argument("--grpc-port", type=int, default=8101)
    parser.add_argument("--http-port", type=int, default=8100)
    parser.add_argument("--metrics-port", type=int, default=8102)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime threads per instance (0: as trtserve, the usable "
                             "cores less one, split between the instances)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=500)
    args = parser.parse_args()

    # The same default as service/backends/onnxruntime.py (this venv lacks trtserve).
    threads = args.threads or max(1, (len(os.sched_getaffinity(0)) - 1) // args.instances)
    probe = session(args.model, 1)
    inputs, outputs = tensors(probe.get_inputs()), tensors(probe.get_outputs())
    del probe
    config = TritonConfig(grpc_address="127.0.0.1", grpc_port=args.grpc_port,
                          http_address="127.0.0.1", http_port=args.http_port,
                          metrics_port=args.metrics_port, log_verbose=0)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=[infer_function(args.model, threads) for _ in range(args.instances)],
            inputs=inputs,
            outputs=outputs,
            config=ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(
                                   max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=False,
        )
        triton.run()
        print("pytriton: serving", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
