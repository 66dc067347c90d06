"""Real trtserve servers for tests and benchmarks: in a thread of this process, or
as a subprocess, on free loopback ports."""

from __future__ import annotations

# Before anything imports grpc: these servers run on the gRPC settings `trtserve
# serve` runs on.
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc

from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.server import Server, loop_factory

T = TypeVar("T")
# The repository: where `python -m trtserve.service.cli` runs from.
ROOT = Path(__file__).resolve().parents[2]


def server_config(*models: ModelConfig, **server: Any) -> ServerConfig:
    """A config bound to a free loopback port, without the metrics endpoint."""
    base = ServerConfig(host="127.0.0.1", port=0, metrics_port=0, http_port=0,
                        grace_period_s=10)
    return dataclasses.replace(base, models=models, **server)


class ServerThread:
    """A Server on its own event loop in a background thread, bound to a free port.

    The loop is the one `trtserve serve` would run for this config (uvloop by default).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.server = Server(config)
        self.loop = (loop_factory(config.event_loop) or asyncio.new_event_loop)()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextmanager
def running_server(config: ServerConfig) -> Iterator[ServerThread]:
    server = ServerThread(config).start()
    try:
        yield server
    finally:
        server.stop()


class ServerProcess:
    """`trtserve serve ...` as a child process, for signal and CLI tests."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.port = free_port()
        self._start(["trtserve.service.cli", "serve", "--port", str(self.port),
                     "--metrics-port", "0", "--http-port", "0", *args], env, preexec)

    def _start(self, module_args: list[str], env: dict[str, str] | None = None,
               preexec: Callable[[], None] | None = None) -> None:
        """Run `python -m MODULE ARGS...`, printing into a file; `preexec` runs in the
        child before Python starts (say, to enter a cgroup).

        A file, not a pipe: nobody reads a pipe while the server runs, and a
        chatty server would block once the pipe's buffer filled.
        """
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=preexec)
        self.url = f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60, service: str = "") -> None:
        """Until health says SERVING for `service` ("" is the server as a whole)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        end = time.monotonic() + timeout
        with grpc.insecure_channel(self.url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited early:\n{self.output()}")
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                    if status.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError as e:
                    # Not up yet, or the service not registered yet; anything else is real.
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND,
                                        grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise
                time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    @contextmanager
    def serving(self, timeout: float = 60) -> Iterator[ServerProcess]:
        """Ready (SERVING) inside; on the way out SIGTERM, and the server must drain
        and exit 0 (its output is the assertion's message otherwise)."""
        try:
            self.wait_ready(timeout)
            yield self
        finally:
            code, output = self.terminate()
            assert code == 0, output

    def terminate(self, timeout: float = 60) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return self.proc.returncode, self.output()

    def output(self) -> str:
        """Everything the server printed so far."""
        self._log.seek(0)
        return self._log.read()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
