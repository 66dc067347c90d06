"""How long one hostile message holds trtserve's event loop, and what another client sees.

Starts `trtserve serve` with the bundled example model (ONNX Runtime) as a
child process, then, for each kind of message below built at `--mb`
megabytes, sends it while a probe client sends small valid requests one at a
time. Prints, per kind, how long the message took to be refused (or
answered) and the probe's worst latency meanwhile against its median before
(medians over `--repeat` sends). The baseline is a message of one tensor of
that size, which is what receiving any message that large costs.
What is left after trtserve's own checks (issue 15, item 3) is protobuf
parsing, which grpc runs on the event loop before any handler: its cost grows
with the number of fields in the message, so the worst kinds are many tiny
fields.

    python -m benchmarks.hostile_messages --mb 4 16 64
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from trtserve.client.convert import infer_request
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.example_model import INPUT_NAME, write_example

MODEL = "example"
V1_INFER = "/trtserve.v1.InferenceService/Infer"
KSERVE_INFER = "/inference.GRPCInferenceService/ModelInfer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _tag(message: type, field: str) -> bytes:
    return _varint(message.DESCRIPTOR.fields_by_name[field].number << 3 | 2)  # type: ignore[attr-defined]


def _repeat(head: bytes, item: bytes, size: int) -> bytes:
    return head + item * max(1, (size - len(head)) // len(item))


def kinds(size: int) -> dict[str, tuple[str, bytes]]:
    """Messages of about `size` bytes made of the smallest fields each protocol takes."""
    x = np.zeros((1, 64), np.float32)
    v1_head = pb.InferRequest(model=MODEL).SerializeToString()
    v1_valid = infer_request(MODEL, {INPUT_NAME: x}).SerializeToString()
    k_head = kpb.ModelInferRequest(model_name=MODEL).SerializeToString()
    k_valid = kpb.ModelInferRequest(model_name=MODEL)
    k_valid.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[1, 64])
    k_valid.raw_input_contents.append(x.tobytes())
    k_valid_bytes = k_valid.SerializeToString()
    dims = pb.Tensor(name=INPUT_NAME, dtype=pb.DATA_TYPE_FP32).SerializeToString()
    shape_tag = _varint(pb.Tensor.DESCRIPTOR.fields_by_name["shape"].number << 3 | 2)
    packed = b"\x01" * (size - 64)
    tensor = dims + shape_tag + _varint(len(packed)) + packed
    entry = kpb.ModelInferRequest(parameters={"k": kpb.InferParameter()}).SerializeToString()
    blob = pb.InferRequest(model=MODEL)
    blob.inputs.add(name=INPUT_NAME, dtype=pb.DATA_TYPE_FP32, shape=[1, 64],
                    data=b"\0" * (size - 64))
    return {
        # Not hostile: what receiving any message of this size costs (a wrong byte count).
        "v1: one tensor of data (baseline)": (V1_INFER, blob.SerializeToString()),
        "v1: empty tensors": (V1_INFER, _repeat(v1_head, _tag(pb.InferRequest, "inputs") + b"\0",
                                                size)),
        "v1: one tensor of 1-byte dims": (
            V1_INFER, v1_head + _tag(pb.InferRequest, "inputs") + _varint(len(tensor)) + tensor),
        "v1: empty output names": (V1_INFER, _repeat(v1_valid,
                                                     _tag(pb.InferRequest, "outputs") + b"\0",
                                                     size)),
        "kserve: empty tensors": (KSERVE_INFER, _repeat(
            k_head, _tag(kpb.ModelInferRequest, "inputs") + b"\0", size)),
        "kserve: empty raw_input_contents": (KSERVE_INFER, _repeat(
            k_head, _tag(kpb.ModelInferRequest, "raw_input_contents") + b"\0", size)),
        # One key repeated: the map keeps one entry, but every one is parsed.
        "kserve: request parameters": (KSERVE_INFER, _repeat(k_valid_bytes, entry, size)),
    }


def _probe(channel: grpc.Channel, stop: threading.Event, latencies: list[float]) -> None:
    call = channel.unary_unary(V1_INFER)
    request = infer_request(MODEL, {INPUT_NAME: np.zeros((1, 64), np.float32)}
                            ).SerializeToString()
    while not stop.is_set():
        start = time.perf_counter()
        call(request, timeout=60)
        latencies.append(time.perf_counter() - start)


def measure(url: str, method: str, data: bytes) -> tuple[float, str, float, float]:
    """(seconds to the answer, its status, probe median before, probe worst during)."""
    with grpc.insecure_channel(url) as probe_channel, grpc.insecure_channel(
            url, options=[("grpc.max_send_message_length", -1)]) as channel:
        before: list[float] = []
        stop = threading.Event()
        warm = threading.Thread(target=_probe, args=(probe_channel, stop, before))
        warm.start()
        time.sleep(0.5)
        stop.set()
        warm.join()
        during: list[float] = []
        stop = threading.Event()
        probe = threading.Thread(target=_probe, args=(probe_channel, stop, during))
        probe.start()
        call: Callable[..., bytes] = channel.unary_unary(method)
        start = time.perf_counter()
        try:
            call(data, timeout=120)
            status = "OK"
        except grpc.RpcError as e:
            status = f"{e.code().name}: {(e.details() or '')[:70]}"
        elapsed = time.perf_counter() - start
        time.sleep(0.2)
        stop.set()
        probe.join()
        return elapsed, status, statistics.median(before), max(during, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--repeat", type=int, default=3,
                        help="sends of each message; the medians are printed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = write_example(Path(tmp) / "example.onnx")
        port = free_port()
        limit = max(args.mb) * 1024 * 1024 + 1024
        server = subprocess.Popen(
            [sys.executable, "-m", "trtserve.service.cli", "serve", "--port", str(port),
             "--metrics-port", "0", "--http-port", "0", "--model", f"{MODEL}={model}",
             "--workers", "1",
             "--max-receive-message-bytes", str(limit), "--log-level", "WARNING"])
        url = f"127.0.0.1:{port}"
        try:
            grpc.channel_ready_future(grpc.insecure_channel(url)).result(timeout=60)
            time.sleep(2)  # the model loads after the port opens
            print(f"{'kind':36} {'MB':>4} {'answer s':>9} {'probe p50 ms':>13} "
                  f"{'probe max ms':>13}  status")
            for mb in args.mb:
                for name, (method, data) in kinds(mb * 1024 * 1024).items():
                    runs = [measure(url, method, data) for _ in range(args.repeat)]
                    elapsed = statistics.median(r[0] for r in runs)
                    status = runs[-1][1]
                    p50 = statistics.median(r[2] for r in runs)
                    worst = statistics.median(r[3] for r in runs)
                    print(f"{name:36} {len(data) / 2**20:4.0f} {elapsed:9.3f} "
                          f"{p50 * 1e3:13.2f} {worst * 1e3:13.1f}  {status}", flush=True)
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
