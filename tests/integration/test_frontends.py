"""`trtserve serve --frontends 2`: one engine process, two frontend processes on one port.

Real processes over real sockets: every answer is checked against ONNX Runtime
run directly on that request's input, so a response lost, swapped between
requests or between frontends fails here. Inputs are small (inline in the link)
and large (through the frontends' shared-memory arenas).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_metrics import key, scrape
from trtserve.client import Client, InferenceError
from trtserve.client.convert import infer_request, outputs_of
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.client.kserve_convert import kserve_outputs, kserve_request
from trtserve.client.shared_memory import SystemRegion
from trtserve.service.ipc.codec import INLINE_MAX_BYTES
from trtserve.service.testing.servers import ServerProcess, free_port

CLIENTS = 64
REQUESTS_PER_CLIENT = 6
FEATURES = 64
# Rows of each request, in turn: inline in the link, and large enough for the arena.
ROWS = (1, 3, INLINE_MAX_BYTES // (FEATURES * 4) + 7)


def _input(client: int, n: int) -> np.ndarray:
    rows = ROWS[(client + n) % len(ROWS)]
    rng = np.random.default_rng(client * 1000 + n)
    return rng.standard_normal((rows, FEATURES)).astype(np.float32)


@pytest.fixture(scope="module")
def server(example_onnx: Path) -> ServerProcess:
    metrics_port = free_port()
    process = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2",
                             "--max-queue-delay-us", "2000", "--metrics-port",
                             str(metrics_port)])
    process.metrics_port = metrics_port  # type: ignore[attr-defined]
    with process.serving():
        yield process


def _frontend_pids(server: ServerProcess) -> list[int]:
    """The live frontend processes (one killed and not yet reaped is a zombie: not one)."""
    pids = []
    for child in psutil.Process(server.proc.pid).children():
        try:
            if "trtserve.service.frontend_process" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # gone, or a zombie
            continue
    return pids


def _own_connection(url: str) -> grpc.aio.Channel:
    """A channel with its own TCP connection: channels of one process share one by default,
    and the kernel spreads connections, not requests, over the frontends."""
    return grpc.aio.insecure_channel(url, options=[("grpc.use_local_subchannel_pool", 1)])


async def _v1_client(url: str, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    async with _own_connection(url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for n in range(REQUESTS_PER_CLIENT):
            x = _input(index, n)
            reply = await stub.Infer(infer_request("example", {"input": x}), timeout=60)
            pairs.append((x, outputs_of(reply)["output"]))
    return pairs


async def _kserve_client(url: str, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
    pairs = []
    async with _own_connection(url) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        for n in range(REQUESTS_PER_CLIENT):
            x = _input(index, n)
            reply = await stub.ModelInfer(kserve_request("example", {"input": x}), timeout=60)
            pairs.append((x, kserve_outputs(reply)["output"]))
    return pairs


async def _load(url: str) -> list[tuple[np.ndarray, np.ndarray]]:
    # One channel per client: connections spread over the frontends by the kernel.
    results = await asyncio.gather(*(
        (_v1_client if i % 2 else _kserve_client)(url, i) for i in range(CLIENTS)))
    return [pair for pairs in results for pair in pairs]


def test_every_answer_is_its_own_across_frontends(server: ServerProcess,
                                                  example_onnx: Path) -> None:
    before = Client(server.url).stats()
    pairs = asyncio.run(_load(server.url))
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    assert len(pairs) == CLIENTS * REQUESTS_PER_CLIENT
    for x, y in pairs:
        (want,) = session.run(None, {"input": x})
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)

    stats = Client(server.url).stats()
    sent = CLIENTS * REQUESTS_PER_CLIENT
    (model,) = stats.models
    (model_before,) = before.models
    assert model.requests - model_before.requests == sent
    assert model.errors == 0
    # Both frontends took part, and their rows add up to the engine's totals.
    assert sorted(f.index for f in stats.frontends) == [0, 1]
    assert sum(f.requests for f in stats.frontends) == model.requests
    assert all(f.requests > 0 for f in stats.frontends), stats.frontends
    assert sorted(f.pid for f in stats.frontends) == sorted(_frontend_pids(server))
    assert all(f.in_flight == 0 for f in stats.frontends)
    # Every request came in a frame, a frame carrying one request or more.
    assert all(0 < f.request_frames <= f.requests for f in stats.frontends), stats.frontends
    # Prometheus (served by the engine process): the same totals, one row per frontend.
    m = scrape(server.metrics_port)  # type: ignore[attr-defined]
    rows = m["trtserve_frontend_requests_total"]
    assert sorted(dict(labels)["frontend"] for labels in rows) == ["0", "1"]
    assert sum(rows.values()) == model.requests
    frames = m["trtserve_frontend_request_frames_total"]
    assert sum(frames.values()) == sum(f.request_frames for f in stats.frontends)
    # Each frontend's open files (its connections among them), in Stats and Prometheus.
    assert all(f.open_files > 0 for f in stats.frontends), stats.frontends
    files = m["trtserve_frontend_open_files"]
    assert sorted(dict(labels)["frontend"] for labels in files) == ["0", "1"]
    assert all(n > 0 for n in files.values())
    assert m["trtserve_model_request_success_total"][key(model="example")] == model.requests
    # Requests the engine read together and queued as one (as many as the load made):
    # counted among the requests, every group of two or more, the same in Prometheus.
    assert model.grouped_requests <= model.requests
    assert 2 * model.groups <= model.grouped_requests
    assert m["trtserve_model_grouped_requests_total"][key(model="example")] == \
        model.grouped_requests
    # KServe's statistics are the same totals, from whichever frontend answers.
    with grpc.insecure_channel(server.url) as channel:
        kstats = kpb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            kpb.ModelStatisticsRequest(name="example"), timeout=10)
    assert kstats.model_stats[0].inference_stats.success.count == model.requests


def test_errors_cross_the_link_with_their_code(server: ServerProcess) -> None:
    with Client(server.url) as c:
        with pytest.raises(InferenceError) as e:
            c.infer("nope", {"input": np.zeros((1, FEATURES), np.float32)}, timeout=10)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(InferenceError) as e:
            c.infer("example", {"input": np.zeros((1, FEATURES + 1), np.float32)}, timeout=10)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "input" in e.value.details


def test_a_killed_frontend_is_restarted(example_onnx: Path) -> None:
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2"])
    try:
        server.wait_ready()
        old = _frontend_pids(server)
        assert len(old) == 2
        os.kill(old[0], signal.SIGKILL)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            pids = _frontend_pids(server)
            new = [p for p in pids if p not in old]
            if new and f"(pid {new[0]}) serving" in server.output():
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"frontend not restarted:\n{server.output()}")
        assert sorted(pids) == sorted([old[1], new[0]])  # the other one was left alone
        server.wait_ready()
        # Both serve: 16 connections (kernel-balanced) get their answers.
        async def load() -> list[list[tuple[np.ndarray, np.ndarray]]]:
            return await asyncio.gather(*(_v1_client(server.url, i) for i in range(16)))

        for pairs in asyncio.run(load()):
            assert all(y.shape == (x.shape[0], 16) for x, y in pairs)
        frontends = Client(server.url).stats().frontends
        assert sorted(f.pid for f in frontends) == sorted(pids)
        assert all(f.requests > 0 for f in frontends), frontends
    finally:
        code, output = server.terminate()
    assert code == 0, output
    assert "frontend-0" in output and "restarting" in output


def test_frontends_exit_when_the_engine_dies(example_onnx: Path) -> None:
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2"])
    server.wait_ready()
    frontends = [psutil.Process(p) for p in _frontend_pids(server)]
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    _gone, alive = psutil.wait_procs(frontends, timeout=30)
    for p in alive:
        p.kill()
    assert not alive, server.output()
    # Not our children (the engine was their parent): their exit codes are not ours to
    # read; the log says why they went.
    assert "engine process went away" in server.output()
    # Nobody listens on the port any more.
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", server.port)) != 0


def test_a_held_port_is_refused_with_frontends(server: ServerProcess,
                                               example_onnx: Path) -> None:
    """The frontends share the port with each other, not with another server."""
    second = subprocess.run(
        [sys.executable, "-m", "trtserve.service.cli", "serve", "--model",
         f"example={example_onnx}",
         "--frontends", "2", "--port", str(server.port), "--metrics-port", "0"],
        capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr
    assert f"server.port: 127.0.0.1:{server.port} is in use" in second.stderr


def test_health_follows_the_engine(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "example", "trtserve.v1.InferenceService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service


def test_regions_and_model_control_reach_the_engine_from_every_frontend(
        server: ServerProcess, example_onnx: Path) -> None:
    """Calls whose state lives in the engine (clients' shared-memory regions, model
    control) cross the link: what one frontend registers or loads, the other sees."""
    reference = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    x = _input(7, 0)[:2]
    with SystemRegion.create(x.nbytes) as region:
        region.array(np.float32, x.shape)[:] = x
        # One client per connection: the port spreads connections over the frontends.
        clients = [Client(server.url) for _ in range(6)]
        try:
            clients[0].register_region(region)
            names = {r.name for c in clients for r in c.region_status()}
            assert names == {region.name}
            for c in clients:
                c._regions[region.name] = region  # the server knows it: send references
                got = c.infer("example", {"input": region.array(np.float32, x.shape)})
                want = reference.run(None, {"input": x})[0]
                np.testing.assert_allclose(got["output"], want, rtol=1e-5, atol=1e-6)
            clients[-1].unregister_region(region)
            assert all(c.region_status() == [] for c in clients)
            before = {m.name: m.version for m in clients[0].list_models()}["example"]
            state = clients[1].reload_model("example")
            assert int(state.version) == int(before) + 1
            assert all({m.name: m.version for m in c.list_models()}["example"] == state.version
                       for c in clients)
            # KServe calls may name the version: the new one, through every frontend.
            request = kserve_request("example", {"input": x}, (), "", None)
            request.model_version = state.version
            for c in clients:
                kserve = kpb_grpc.GRPCInferenceServiceStub(c._channel)
                got = kserve_outputs(kserve.ModelInfer(request, timeout=10))
                np.testing.assert_allclose(got["output"], want, rtol=1e-5, atol=1e-6)
                kserve.ModelMetadata(kpb.ModelMetadataRequest(name="example",
                                                              version=state.version), timeout=10)
            request.model_version = before
            with pytest.raises(grpc.RpcError) as err:
                kserve.ModelInfer(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert f"version '{state.version}' is served" in err.value.details()
        finally:
            for c in clients:
                c.close()
