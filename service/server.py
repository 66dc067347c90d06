"""The gRPC server: servicers, health, reflection, security and the lifecycle.

Start: bind and answer health (NOT_SERVING) first, then load the models and
flip each to SERVING once its workers are up. Stop (SIGTERM/SIGINT): health to
NOT_SERVING, refuse new requests with UNAVAILABLE, answer every accepted one,
then `server.stop(grace)`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service import auth, descriptors
from service.config import ModelConfig, ServerConfig
from service.errors import ConfigError
from service.frontends.kserve import add_to_server
from service.frontends.v1 import InferenceService
from service.gen.trtserve.v1 import inference_pb2, inference_pb2_grpc
from service.metrics import start_metrics
from service.metrics_process import MetricsProcess
from service.model import ModelRuntime
from service.repository import ModelRepository

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
V1_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models = ModelRepository()
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsProcess | None = None
        self._stopping = asyncio.Event()
        self._services: list[str] = [V1_SERVICE]
        self._background: set[asyncio.Task[None]] = set()
        # Every configured model loaded and not draining (KServe ServerReady).
        self._ready = False

    def _grpc_options(self) -> list[tuple[str, int]]:
        c = self.config
        options = [
            ("grpc.max_receive_message_length", c.max_receive_message_bytes),
            ("grpc.max_send_message_length", c.max_send_message_bytes),
            # Many clients share one connection through HTTP/2 streams; keep it alive.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
        if c.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", c.max_concurrent_streams))
        return options

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        token = auth.load_token(self.config.auth_token_file)
        if token is None:
            return []
        return [auth.TokenAuth(token, self.config.health_requires_auth)]

    def _bind(self, server: grpc.aio.Server) -> int:
        c = self.config
        address = f"{c.host}:{c.port}" if ":" not in c.host else f"[{c.host}]:{c.port}"
        if c.tls.enabled:
            ca = _read_pem("client_ca_file", c.tls.client_ca_file) \
                if c.tls.client_ca_file else None
            credentials = grpc.ssl_server_credentials(
                [(_read_pem("key_file", c.tls.key_file), _read_pem("cert_file", c.tls.cert_file))],
                root_certificates=ca, require_client_auth=ca is not None)
            return server.add_secure_port(address, credentials)
        return server.add_insecure_port(address)

    def _warn_if_exposed(self, has_token: bool) -> None:
        if _is_loopback(self.config.host):
            return
        if not self.config.tls.enabled:
            log.warning("listening on %s without TLS: traffic can be read on the network",
                        self.config.host)
        if not has_token:
            log.warning("listening on %s without an auth token: anyone who can reach the "
                        "port can run inference", self.config.host)

    async def start(self) -> int:
        """Bind, answer health, then load every model. Returns the bound port."""
        interceptors = self._interceptors()
        server = grpc.aio.server(options=self._grpc_options(), interceptors=interceptors)
        services = _GenericHandlersOnly(server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceService(self.models), services)
        self._add_kserve(services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        names = [*self._services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME]
        # Our types live in trtserve's own pool; reflection describes from it.
        pool = descriptors.include(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
        # What reflection.enable_server_reflection does for an aio server, through `services`.
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names, pool=pool),  # type: ignore[attr-defined]
            services)
        self.port = self._bind(server)
        if self.port == 0:
            raise OSError(f"could not bind {self.config.host}:{self.config.port}")
        self._warn_if_exposed(bool(interceptors))
        for name in ("", *self._services):
            await self.health.set(name, NOT_SERVING)
        await server.start()
        self._server = server
        log.info("listening on %s:%d", self.config.host, self.port)
        self._start_metrics()
        for model in self.config.models:
            await self.health.set(model.name, NOT_SERVING)
        await asyncio.gather(*(self._load(m) for m in self.config.models))
        for name in ("", *self._services):
            await self.health.set(name, SERVING)
        self._ready = True
        return self.port

    async def _load(self, config: ModelConfig) -> None:
        """Load one model; it turns SERVING as soon as its workers are up."""
        runtime = await self.models.load(config, self.config.stats_window_s)
        self._watch_health(runtime)
        await self.health.set(config.name, SERVING)

    async def add_model(self, runtime: ModelRuntime) -> None:
        """Serve a runtime built outside the config (tests, later hot loading)."""
        await self.models.add(runtime)
        self._watch_health(runtime)
        await self.health.set(runtime.name, SERVING if runtime.healthy_workers else NOT_SERVING)

    def _watch_health(self, runtime: ModelRuntime) -> None:
        runtime.on_health_change = self._on_model_health

    def _on_model_health(self, name: str, serving: bool) -> None:
        """A model lost (or regained) every healthy worker: say so in grpc.health.v1."""
        log.warning("model '%s' is now %s", name, "SERVING" if serving else "NOT_SERVING")
        task = asyncio.get_running_loop().create_task(
            self.health.set(name, SERVING if serving else NOT_SERVING))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _add_kserve(self, server: _GenericHandlersOnly) -> None:
        """KServe v2 / Open Inference Protocol on the same port as trtserve.v1."""
        self._services.append(add_to_server(server, self.models,
                                            server_ready=lambda: self._ready))

    def _start_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        self._metrics = start_metrics(self.config, self.models)

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new work, answer accepted work, then close."""
        if self._server is None:
            return
        self._ready = False
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_period_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            await asyncio.wait_for(self.models.drain(), timeout=grace)
        except TimeoutError:
            log.warning("grace period of %.1fs ended with work in flight", grace)
        await self._server.stop(grace=1.0)
        # A stuck executor must not keep the process alive past the grace period:
        # worker threads are daemons, so giving up on them lets the process exit.
        try:
            await asyncio.wait_for(self.models.stop(), timeout=max(1.0, deadline - loop.time()))
        except TimeoutError:
            log.error("workers did not stop within the grace period; exiting without them")
        if self._metrics is not None:
            self._metrics.shutdown()
        self._server = None

    def request_stop(self) -> None:
        self._stopping.set()

    async def serve_until_signal(self) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        log.info("event loop: %s.%s", type(loop).__module__, type(loop).__name__)
        await self.start()
        await self._stopping.wait()
        log.info("stopping: draining in-flight requests")
        await self.stop()


class _GenericHandlersOnly:
    """The server, as the generated `add_*_to_server` functions see it: generic handlers only.

    Those functions also register each method with grpc.aio, which then keeps
    one pending "next call" future per registered method (about 30 here) and
    runs `asyncio.wait` over all of them for every call that arrives: about a
    third of the event loop's Python time under load in the profile
    (docs/benchmarks.md). Generic handlers share one future, and finding a
    method in them is a dict lookup per service. Worth about 6% of throughput
    at concurrency 128 on `light` in an A/B run.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        """Left out on purpose: the generic handler added alongside serves these methods."""


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `server.event_loop` names; None: asyncio's default.

    uvloop runs the loop itself (epoll, callbacks, timers) in C: grpc.aio's
    per-call tasks and callbacks cost less Python with it (docs/benchmarks.md,
    "gRPC transport"). The serving clock does not depend on the choice
    (service.timer.now).
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("server.event_loop: 'uvloop' is not installed "
                              "(pip install uvloop), or choose 'asyncio'") from None
        return None
    return uvloop.new_event_loop


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _read_pem(key: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"server.tls.{key}: cannot read {path}: {e.strerror}") from None
