"""grpc.health.v1 through a server's whole life, and server reflection, over real gRPC.

Start-up is held at a known point without touching the server's code: model
files are opened on the event loop's default executor, which here has one
thread that the test keeps busy until it has looked at the server. Drain is
held the same way from the other end: a request to the controlled double waits
at its gate while the server drains.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.doubles.controlled import ControlledBackend, controlled_model, expected
from trtserve.client import Client
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as kpb_grpc
from trtserve.service.config import ModelConfig
from trtserve.service.server import Server
from trtserve.service.testing.servers import free_port, running_server, server_config

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
V1 = "trtserve.v1.InferenceService"
KSERVE = "inference.GRPCInferenceService"


class LoopThread:
    """An event loop in a background thread whose default executor the test holds."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextmanager
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    try:
        yield lt
    finally:
        lt.close()


def _status(stub: health_pb2_grpc.HealthStub, service: str) -> int:
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5,
                      wait_for_ready=True).status


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for: {what}"
        time.sleep(0.01)


class Watcher:
    """Every status grpc.health.v1 Watch sends for one service, in order."""

    def __init__(self, channel: grpc.Channel, service: str) -> None:
        self.statuses: list[int] = []
        self._call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), wait_for_ready=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self.statuses.append(response.status)
        except grpc.RpcError:
            pass  # the server went away: the watch ends

    def distinct(self) -> list[int]:
        """Statuses with repeats collapsed (Watch may resend an unchanged one)."""
        out: list[int] = []
        for s in self.statuses:
            if not out or out[-1] != s:
                out.append(s)
        return out

    def join(self) -> None:
        self._thread.join(10)


def test_health_not_serving_then_serving_then_not_serving_while_draining(example_onnx):
    port = free_port()
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1),
                           port=port)
    server = Server(config)
    gate = threading.Event()
    with loop_thread() as lt, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        # The executor's one thread waits at the gate: the model file can't be opened yet.
        blocker = lt.submit(asyncio.to_thread(gate.wait))
        started = lt.submit(server.start())
        health = health_pb2_grpc.HealthStub(channel)
        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        try:
            # Up and answering, but the model is still loading.
            for service in ("", "example", V1, KSERVE):
                assert _status(health, service) == NOT_SERVING, service
            watchers = {s: Watcher(channel, s) for s in ("", "example")}
            assert not kserve.ServerReady(kpb.ServerReadyRequest()).ready
            assert not kserve.ModelReady(kpb.ModelReadyRequest(name="example")).ready
            assert kserve.ServerLive(kpb.ServerLiveRequest()).live
        finally:
            gate.set()
        blocker.result(10)
        assert started.result(60) == port
        for service in ("", "example", V1, KSERVE):
            assert _status(health, service) == SERVING, service
        assert kserve.ServerReady(kpb.ServerReadyRequest()).ready
        assert kserve.ModelReady(kpb.ModelReadyRequest(name="example")).ready

        # A request held inside the controlled double keeps the drain going.
        double = ControlledBackend()
        lt.submit(server.add_model(double.runtime(controlled_model("held")))).result(30)
        assert _status(health, "held") == SERVING
        double.controls.hold()
        x = np.ones((1, 8), np.float32)
        with ThreadPoolExecutor(1) as pool, Client(f"127.0.0.1:{port}") as client:
            answer = pool.submit(client.infer, "held", {"x": x}, None, 30)
            assert double.controls.started.wait(10)
            stopped = lt.submit(server.stop())
            try:
                _wait(lambda: _status(health, "") == NOT_SERVING, "server NOT_SERVING")
                for service in ("example", "held", V1, KSERVE):
                    assert _status(health, service) == NOT_SERVING, service
                assert not kserve.ServerReady(kpb.ServerReadyRequest()).ready
                assert not answer.done(), "the held request should still be in flight"
            finally:
                double.controls.release()
            np.testing.assert_array_equal(answer.result(30)["y"], expected(x))
            stopped.result(30)
        for w in watchers.values():
            w.join()
    for service, w in watchers.items():
        assert w.distinct() == [NOT_SERVING, SERVING, NOT_SERVING], (service, w.statuses)


# --- reflection ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(example_onnx):
    with running_server(server_config(ModelConfig(name="example",
                                                  path=str(example_onnx)))) as s:
        yield s


def _reflect(channel: grpc.Channel, **request: str) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10)
    return next(iter(responses))


def test_reflection_lists_both_inference_services(server):
    with grpc.insecure_channel(server.url) as channel:
        listed = _reflect(channel, list_services="").list_services_response.service
    names = {s.name for s in listed}
    assert {V1, KSERVE, "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


@pytest.mark.parametrize("service,methods", [
    (V1, {"Infer", "InferStream", "Stats", "ModelMetadata"}),
    (KSERVE, {"ServerLive", "ModelInfer", "ModelStreamInfer", "ModelConfig",
              "ModelStatistics"}),
])
def test_file_containing_symbol_describes_each_service(server, service, methods):
    with grpc.insecure_channel(server.url) as channel:
        response = _reflect(channel, file_containing_symbol=service)
    assert not response.HasField("error_response"), response.error_response
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in response.file_descriptor_response.file_descriptor_proto]
    package, name = service.rsplit(".", 1)
    found = [s for f in files if f.package == package for s in f.service if s.name == name]
    assert len(found) == 1
    assert methods <= {m.name for m in found[0].method}


def test_a_grpcurl_style_client_resolves_every_kserve_type(server):
    """What grpcurl does: build a descriptor pool from reflection alone, dependencies too."""
    with grpc.insecure_channel(server.url) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName(KSERVE)
        config = service.methods_by_name["ModelConfig"].output_type
        # ModelConfigResponse.config is defined in model_config.proto, a dependency.
        assert config.fields_by_name["config"].message_type.full_name == "inference.ModelConfig"
        v1 = pool.FindServiceByName(V1)
        assert v1.methods_by_name["Stats"].output_type.full_name == "trtserve.v1.StatsResponse"


def test_reflection_v1_answers_as_v1alpha_does(server):
    """Newer grpcurl asks grpc.reflection.v1 first; its messages are v1alpha's, renamed."""
    with grpc.insecure_channel(server.url) as channel:
        call = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        listed = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=10)))
        described = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=V1)]), timeout=10)))
        itself = next(iter(call(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection")]), timeout=10)))
    names = {s.name for s in listed.list_services_response.service}
    assert {V1, KSERVE, "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    assert any(s.name == "InferenceService" for f in files for s in f.service)
    # It describes itself too (grpcurl describe): the v1 names, v1alpha's messages.
    own = [descriptor_pb2.FileDescriptorProto.FromString(raw)
           for raw in itself.file_descriptor_response.file_descriptor_proto]
    method = next(m for f in own if f.package == "grpc.reflection.v1"
                  for s in f.service for m in s.method)
    assert method.input_type == ".grpc.reflection.v1.ServerReflectionRequest"
