"""Shared pieces of the reliability tests: a server with the controlled double, health."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.doubles.controlled import ControlledBackend, Controls, controlled_model
from trtserve.client import Client
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.testing.servers import ServerThread, running_server, server_config


@dataclass
class Served:
    server: ServerThread
    double: ControlledBackend
    runtime: ModelRuntime

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def controls(self) -> Controls:
        return self.double.controls


@contextmanager
def serve_controlled(name: str = "controlled", server: dict[str, object] | None = None,
                     max_batch_size: int = 32, **model: object) -> Iterator[Served]:
    """An in-process server on a free port serving the double as `name`."""
    double = ControlledBackend(max_batch_size=max_batch_size)
    runtime = double.runtime(controlled_model(name, max_batch_size=max_batch_size, **model))
    with running_server(server_config(**(server or {}))) as s:
        s.call(s.server.add_model(runtime))
        yield Served(s, double, runtime)


def health_status(channel: grpc.Channel, service: str,
                  metadata: tuple[tuple[str, str], ...] | None = None) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5,
                      metadata=metadata).status


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether `predicate` became true within `timeout` seconds (polled)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)
    return True


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
             show: Callable[[], object] | None = None) -> None:
    assert eventually(predicate, timeout), f"condition not reached in time: {show and show()}"


def model_stats(url: str, model: str = "controlled") -> pb.ModelStats:
    with Client(url) as c:
        return c.stats(model).models[0]
