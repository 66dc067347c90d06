"""The gRPC server: servicers, health, reflection, security and the lifecycle.

Start: check what can be checked (token, TLS files, ports, model files), bind
and answer health (NOT_SERVING), then load the models and flip each to SERVING
once its workers are up; "serving on" is logged only then. Stop (SIGTERM/SIGINT): health to
NOT_SERVING, refuse new requests with UNAVAILABLE, answer every accepted one,
then `server.stop(grace)`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from trtserve.client import descriptors
from trtserve.client.gen.trtserve.v1 import inference_pb2, inference_pb2_grpc
from trtserve.service import auth, cpus, ports, tls
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.folder import FolderModel, scan
from trtserve.service.engine.folder_watch import FolderWatch
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.engine.regions import RegionRegistry
from trtserve.service.engine.repository import ModelRepository, check_model
from trtserve.service.engine.watch import FileWatch
from trtserve.service.errors import ConfigError, PortInUse, StartError
from trtserve.service.frontends import malformed
from trtserve.service.frontends.http_guard import HttpLimits
from trtserve.service.frontends.kserve import add_to_server
from trtserve.service.frontends.kserve_http import HttpServer, KServeHttp
from trtserve.service.frontends.streaming import StreamLimits
from trtserve.service.frontends.unsent import UnsentAnswers, UnsentLimits
from trtserve.service.frontends.v1 import InferenceService
from trtserve.service.limits import ByteBudget
from trtserve.service.memory import Trimmer
from trtserve.service.metrics import start_metrics
from trtserve.service.metrics_process import MetricsProcess

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
V1_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _ms(seconds: float) -> int:
    """A positive number of seconds in gRPC's milliseconds, never rounded down to 0."""
    return max(1, round(seconds * 1000))


class Server:
    # Whether this process binds its ports beside other processes of the same server
    # (a frontend process: SO_REUSEPORT); one process alone does not.
    _shares_ports = False
    # One more trim this long after each burst's (memory.Trimmer); 0: none.
    _trim_follow_up_s = 0.0

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models = ModelRepository(config.stats_window_s)
        for model in config.models:
            self.models.know(model)
        if config.model_repository:
            self.models.folder = os.path.abspath(config.model_repository)
        # The repository folder as read at start: the folder watch's baseline.
        self._folder_at_start: dict[str, FolderModel] = {}
        # Request bytes in flight over both protocols; after a large request, glibc's
        # free memory goes back to the system.
        self.trimmer = Trimmer(self._trim_follow_up_s)
        # Answers gRPC holds for clients that do not read them, by connection (both
        # protocols' services share it: its limits are the connection's and the process's).
        self.unsent = UnsentAnswers(UnsentLimits(
            per_connection=config.max_unsent_bytes_per_connection,
            total=config.max_unsent_bytes, max_answer=config.max_send_message_bytes),
            on_sent=self._answer_sent)
        # Where this process's threads and the frontends run (server.engine_cpus), once
        # started; None: where the kernel puts them.
        self.cpus: cpus.CpuPlan | None = None
        self.budget = ByteBudget(config.max_request_bytes_in_flight,
                                 config.trim_after_request_bytes, self.trimmer.request)
        # What the frontends and metrics see of the models: plain data through one seam.
        # Shared-memory regions clients register live in the engine, for every protocol.
        self.engine = LocalEngine(self.models, self.budget,
                                  RegionRegistry(config.shared_memory),
                                  model_control=config.model_control)
        self.engine.add_health_listener(self._on_model_health)
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.port = 0
        # KServe v2 over HTTP/REST (server.http_port); 0 while off.
        self.http_port = 0
        self._http: HttpServer | None = None
        self._server: grpc.aio.Server | None = None
        self._metrics: MetricsProcess | None = None
        self._stopping = asyncio.Event()
        self._services: list[str] = [V1_SERVICE]
        self._background: set[asyncio.Task[None]] = set()
        # Every configured model loaded and not draining (KServe ServerReady).
        self._ready = False
        self.watch: FileWatch | None = None
        self.folder_watch: FolderWatch | None = None
        self._watch_tasks: list[asyncio.Task[None]] = []

    def _grpc_options(self) -> list[tuple[str, int]]:
        c = self.config
        options = [
            *ports.GRPC_OPTIONS,
            ("grpc.max_receive_message_length", c.max_receive_message_bytes),
            ("grpc.max_send_message_length", c.max_send_message_bytes),
            # Many clients share one connection through HTTP/2 streams; keep it alive.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.server_handshake_timeout_ms", _ms(c.grpc_handshake_timeout_s)),
        ]
        if cap := c.resolved_grpc_max_connections:
            # One more is closed as it opens (gRPC's connection quota); those held go on.
            options.append(("grpc.max_allowed_incoming_connections", cap))
        if c.grpc_max_connection_idle_s:
            options.append(("grpc.max_connection_idle_ms", _ms(c.grpc_max_connection_idle_s)))
        if c.grpc_max_connection_age_s:
            options += [("grpc.max_connection_age_ms", _ms(c.grpc_max_connection_age_s)),
                        ("grpc.max_connection_age_grace_ms",
                         round(c.grpc_max_connection_age_grace_s * 1000))]
        if c.max_concurrent_streams:
            options.append(("grpc.max_concurrent_streams", c.max_concurrent_streams))
        if c.max_pending_calls:
            # Soft and hard limit alike: below it none is refused, past it every one.
            options += [("grpc.server.max_pending_requests", c.max_pending_calls),
                        ("grpc.server.max_pending_requests_hard_limit", c.max_pending_calls)]
        return options

    def _interceptors(self, token: str | None) -> list[grpc.aio.ServerInterceptor]:
        if token is None:
            return []
        return [auth.TokenAuth(token, self.config.health_requires_auth)]

    def _address(self) -> str:
        c = self.config
        return f"{c.host}:{c.port}" if ":" not in c.host else f"[{c.host}]:{c.port}"

    def _bind(self, server: grpc.aio.Server) -> int:
        c = self.config
        try:
            if c.tls.enabled:
                return server.add_secure_port(self._address(), tls.server_credentials(c.tls))
            return server.add_insecure_port(self._address())
        except RuntimeError:
            # ports.check_free passed, so another process took the port since.
            raise PortInUse(f"server.port: cannot bind {self._address()}: in use by another "
                            "process or not an address of this machine") from None

    def _preflight(self) -> tuple[str | None, list[tuple[ModelConfig, str]]]:
        """Everything checkable before a model loads: the token, TLS files, ports and
        model files. Returns the token and the models to load, each with the version
        to serve it as; raises a StartError."""
        c = self.config
        token = auth.load_token(c.auth_token_file)
        tls.check(c.tls)
        ports.check_free(c.host, c.port, "server.port")
        if c.metrics_port:
            ports.check_free(c.host, c.metrics_port, "server.metrics_port")
        if c.http_port:
            ports.check_free(c.host, c.http_port, "server.http_port")
        to_load = [(model, "1") for model in c.models] + self._read_folder()
        checked = []
        for model, version in to_load:
            try:
                check_model(model)
            except StartError as e:
                self._load_failed(model.name, e)
                continue
            checked.append((model, version))
        return token, checked

    def _read_folder(self) -> list[tuple[ModelConfig, str]]:
        """The models of server.model_repository, each at the version it serves."""
        root = self.models.folder
        if not root:
            return []
        try:
            self._folder_at_start = scan(root)
        except OSError as e:
            raise ConfigError(f"server.model_repository: got {self.config.model_repository!r}, "
                              f"expected a folder that can be read ({e.strerror or e})") from None
        configured = {m.name for m in self.config.models}
        both = sorted(configured & set(self._folder_at_start))
        if both:
            raise ConfigError(f"models.name: {both} are [[models]] and in the repository "
                              f"folder {root} too; name each model once")
        found = []
        for name, entry in self._folder_at_start.items():
            if entry.empty:  # a folder being set up: nothing to load yet, no failure
                self.models.list_unavailable(name, entry.error)
            elif entry.config is None:
                self._load_failed(name, ConfigError(f"model '{name}': {entry.error}"))
            else:
                found.append((entry.config, entry.version))
        log.info("repository folder %s: %d model(s)", root, len(self._folder_at_start))
        return found

    def _load_failed(self, name: str, error: StartError) -> None:
        """Exit on the first model that fails, or skip it (server.model_load_failure)."""
        if self.config.model_load_failure == "exit":
            raise error
        log.error("model '%s' skipped (server.model_load_failure = \"skip\"): %s",
                  name, error)
        self.models.failed[name] = str(error)

    def _warn_if_exposed(self, has_token: bool) -> None:
        if _is_loopback(self.config.host):
            return
        if not self.config.tls.enabled:
            log.warning("bound to %s without TLS: traffic can be read on the network",
                        self.config.host)
        if not has_token:
            log.warning("bound to %s without an auth token: anyone who can reach the "
                        "port can run inference%s", self.config.host,
                        ", and load, unload and reload models from files on this host "
                        "(server.model_control)" if self.config.model_control else "")

    def _place(self, frontends: int) -> None:
        """Run this process's threads on `server.engine_cpus`, before it starts any more:
        they inherit it (ONNX Runtime's, the workers', gRPC's, the frontends' processes,
        which then move to the rest: `cpus`)."""
        self.cpus = cpus.plan(self.config.engine_cpus, frontends)
        if self.cpus is not None:
            cpus.pin_process(self.cpus.engine)
            log.info("engine on CPUs %s%s", cpus.format_list(self.cpus.engine),
                     f", frontends on {cpus.format_list(self.cpus.frontends)}"
                     if frontends > 1 else "")

    async def start(self) -> int:
        """Check, bind and answer health (NOT_SERVING), then load every model. Returns
        the bound port. Raises a StartError (one line, naming what to fix) when the
        server cannot start; it then holds no port and no model."""
        token, to_load = self._preflight()
        self._place(1)
        await self._start_grpc(token)
        try:
            self._start_metrics()
            await self._start_http(token)
            await self._load_all(to_load)
        except BaseException:
            await self.stop()
            raise
        await self._set_serving(True)
        self._start_watch()
        log.info("serving %d model(s) on %s:%d", len(self.models), self.config.host, self.port)
        return self.port

    async def _start_grpc(self, token: str | None) -> None:
        """Bind the port and serve every service, health NOT_SERVING throughout."""
        interceptors = self._interceptors(token)
        server = grpc.aio.server(options=self._grpc_options(), interceptors=interceptors,
                                 maximum_concurrent_rpcs=self.config.max_calls_in_flight or None)
        services = _GenericHandlersOnly(server)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceService(self.engine, self._stream_limits(), self.config.shared_memory,
                             self._refused, self.unsent),
            services)
        self._add_kserve(services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        _add_reflection(services, [
            *self._services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
        self.port = self._bind(server)
        if self.port == 0:
            raise PortInUse(f"server.port: cannot bind {self._address()}")
        self._warn_if_exposed(bool(interceptors))
        for name in ("", *self._services, *(m.name for m in self.config.models),
                     *self._folder_at_start):
            await self.health.set(name, NOT_SERVING)
        await server.start()
        self._server = server

    async def _set_serving(self, serving: bool) -> None:
        """The server as a whole (and each protocol's service) ready or not."""
        for name in ("", *self._services):
            await self.health.set(name, SERVING if serving else NOT_SERVING)
        self._ready = serving

    async def _load_all(self, to_load: list[tuple[ModelConfig, str]]) -> None:
        log.info("loading %d model(s); health answers NOT_SERVING on port %d until they are "
                 "loaded", len(to_load), self.port)
        configs = [config for config, _ in to_load]
        results = await asyncio.gather(*(self._load(m, v) for m, v in to_load),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, StartError):
                raise result
        failed = [(m, r) for m, r in zip(configs, results, strict=True)
                  if isinstance(r, StartError)]
        if failed and self.config.model_load_failure == "exit":
            for _, error in failed[1:]:
                log.error("%s", error)
            raise failed[0][1]
        for model, error in failed:
            self._load_failed(model.name, error)
        # A repository folder may be empty or broken at start and filled later.
        if self.models.failed and not len(self.models) and not self.models.folder:
            raise StartError("no model could be loaded; the errors above say why")

    async def _load(self, config: ModelConfig, version: str = "1") -> None:
        """Load one model; it turns SERVING as soon as its workers are up. (Models loaded,
        reloaded or unloaded later are followed by the engine's health listener.)"""
        await self.models.load(config, self.config.stats_window_s, version)
        await self.health.set(config.name, SERVING)

    def _start_watch(self) -> None:
        """Reload models whose file changed, and follow the repository folder
        (server.model_watch_interval_s)."""
        interval = self.config.model_watch_interval_s
        if not interval:
            return
        loop = asyncio.get_running_loop()
        # Files in the repository folder are the folder watch's.
        served = lambda: [(m.name, m.config.path) for m in self.models  # noqa: E731
                          if not self.models.in_folder(m.config.path)]
        self.watch = FileWatch(served, self.engine.reload, interval)
        self._watch_tasks.append(loop.create_task(self.watch.run(), name="model-file-watch"))
        if self.models.folder:
            self.folder_watch = FolderWatch(self.models, self.models.folder, interval,
                                            self._folder_at_start)
            self._watch_tasks.append(loop.create_task(self.folder_watch.run(),
                                                      name="model-folder-watch"))

    async def add_model(self, runtime: ModelRuntime) -> None:
        """Serve a runtime built outside the config (tests, later hot loading)."""
        await self.models.add(runtime)
        self.engine.watch(runtime)
        await self.health.set(runtime.name, SERVING if runtime.healthy_workers else NOT_SERVING)

    def _on_model_health(self, name: str, serving: bool) -> None:
        """A model lost (or regained) every healthy worker, or was loaded, reloaded or
        unloaded: say so in grpc.health.v1."""
        log.log(logging.INFO if serving else logging.WARNING, "model '%s' is now %s", name,
                "SERVING" if serving else "NOT_SERVING")
        task = asyncio.get_running_loop().create_task(
            self.health.set(name, SERVING if serving else NOT_SERVING))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _add_kserve(self, server: _GenericHandlersOnly) -> None:
        """KServe v2 / Open Inference Protocol on the same port as trtserve.v1."""
        self._services.append(add_to_server(server, self.engine,
                                            server_ready=lambda: self._ready,
                                            stream_limits=self._stream_limits(),
                                            shared_memory=self.config.shared_memory,
                                            on_refused=self._refused,
                                            unsent=self.unsent))

    def _answer_sent(self, size: int) -> None:
        """gRPC is done with an answer (sent, or its call ended): a large one's memory goes
        back to the system, as a large request's does (engine/budget, `_refused`)."""
        large = self.config.trim_after_request_bytes
        if large and size >= large:
            self.trimmer.request()

    def _refused(self, request: Any) -> None:
        """A large request refused before the engine saw it: give its memory back too (the
        engine's byte budget does so for the requests it runs), in this process, which
        decoded it."""
        large = self.config.trim_after_request_bytes
        if large and request.ByteSize() >= large:
            self.trimmer.request()

    def _stream_limits(self) -> StreamLimits:
        return StreamLimits(max_in_flight=self.config.max_in_flight_per_stream,
                            max_unsent_bytes=self.config.max_unsent_bytes_per_stream)

    async def _start_http(self, token: str | None) -> None:
        """KServe v2 over HTTP/REST on its own port: the same engine, token, TLS and limits."""
        c = self.config
        if not c.http_port:
            return
        api = KServeHttp(self.engine, server_ready=lambda: self._ready, token=token,
                         health_requires_auth=c.health_requires_auth,
                         max_request_bytes=c.max_receive_message_bytes,
                         max_response_bytes=c.max_send_message_bytes,
                         body_timeout_s=c.http_body_timeout_s,
                         shared_memory=c.shared_memory,
                         max_json_bytes=c.http_max_json_bytes, unsent=self.unsent)
        context = tls.server_ssl_context(c.tls) if c.tls.enabled else None
        limits = HttpLimits(max_connections=c.http_max_connections,
                            header_timeout_s=c.http_header_timeout_s,
                            keepalive_timeout_s=c.http_keepalive_timeout_s,
                            body_timeout_s=c.http_body_timeout_s)
        # Frontend processes share the port (SO_REUSEPORT), as they share gRPC's.
        self._http = HttpServer(api, c.host, c.http_port, context,
                                reuse_port=self._shares_ports, limits=limits)
        try:
            self.http_port = await self._http.start()
        except OSError as e:
            self._http = None
            # ports.check_free passed, so another process took the port since.
            raise PortInUse(f"server.http_port: cannot bind {c.host}:{c.http_port}: "
                            f"{e.strerror or e}") from None
        log.info("KServe v2 HTTP/REST on %s:%d%s", c.host, self.http_port,
                 " (TLS)" if context else "")

    def _start_metrics(self) -> None:
        if not self.config.metrics_port:
            return
        try:
            self._metrics = start_metrics(self.config, self.engine)
        except OSError as e:
            raise PortInUse(f"server.metrics_port: cannot serve metrics on "
                            f"{self.config.metrics_host}:{self.config.metrics_port}: "
                            f"{e.strerror or e}") from None

    async def stop(self) -> None:
        """Drain: NOT_SERVING, refuse new work, answer accepted work, then close."""
        if self._server is None:
            return
        self._ready = False
        for task in self._watch_tasks:
            task.cancel()
        self._watch_tasks.clear()
        await self.health.enter_graceful_shutdown()
        grace = self.config.grace_period_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        try:
            await asyncio.wait_for(self._drain(), timeout=grace)
        except TimeoutError:
            log.warning("grace period of %.1fs ended with work in flight", grace)
        await self._server.stop(grace=1.0)
        if self._http is not None:
            # Accepted requests were answered in the drain; this closes the connections.
            await self._http.stop()
            self._http = None
        # A stuck executor must not keep the process alive past the grace period:
        # worker threads are daemons, so giving up on them lets the process exit.
        try:
            await asyncio.wait_for(self.models.stop(), timeout=max(1.0, deadline - loop.time()))
        except TimeoutError:
            log.error("workers did not stop within the grace period; exiting without them")
        if self._metrics is not None:
            self._metrics.shutdown()
        self.trimmer.close()
        self.engine.close()
        self._server = None

    async def _drain(self) -> None:
        """Refuse new requests (UNAVAILABLE) and wait for the accepted ones."""
        await self.models.drain()

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

    The generic handler is built here, from the dict of method handlers the
    generated functions pass to `add_registered_method_handlers`, so that every
    method's deserializer can be guarded against malformed bytes first.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Left out on purpose: the generated functions hand the same methods to
        `add_registered_method_handlers` next, which serves them guarded."""

    def add_registered_method_handlers(self, service: str,
                                       handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        """Serve `handlers` through one generic handler, each answering malformed
        request bytes INVALID_ARGUMENT (frontends/malformed.py)."""
        guarded = {method: malformed.guard(h) for method, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),))


# grpc.reflection.v1 is v1alpha under another package name: the same messages,
# field for field. grpcio-reflection serves only v1alpha, while newer grpcurl and
# other tools ask for v1 first, so one servicer answers both.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _add_reflection(services: _GenericHandlersOnly, served: list[str]) -> None:
    """Server reflection (v1 and v1alpha) over `served` and itself, from trtserve's pool."""
    names = [*served, reflection.SERVICE_NAME, REFLECTION_V1]
    # Our types live in trtserve's own pool; reflection describes from it.
    pool = descriptors.include(health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
    descriptors.include_renamed(reflection_pb2.DESCRIPTOR, "grpc.reflection.v1alpha",
                                "grpc.reflection.v1", "grpc/reflection/v1/reflection.proto")
    servicer = reflection.aio.ReflectionServicer(names, pool=pool)  # type: ignore[attr-defined]
    # What reflection.enable_server_reflection does for an aio server, through `services`.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, services)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    services.add_registered_method_handlers(REFLECTION_V1, {"ServerReflectionInfo": handler})


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `server.event_loop` names; None: asyncio's default.

    uvloop runs the loop itself (epoll, callbacks, timers) in C: grpc.aio's
    per-call tasks and callbacks cost less Python with it (docs/benchmarks.md,
    "gRPC transport"). The serving clock does not depend on the choice
    (trtserve.client.timer.now).
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
