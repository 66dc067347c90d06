"""KServe v2 over HTTP/REST (the Open Inference Protocol's REST API, as Triton serves it).

The same engine, auth, TLS, limits, deadlines and errors as the gRPC frontends,
on its own port (`server.http_port`), served by aiohttp on the event loop that
runs grpc.aio. Handlers convert, delegate, return: bodies go through
kserve_json, models and statistics through kserve_model_config (as for gRPC),
inference through `Engine.infer`, errors through frontends/errors.py (one
table from gRPC codes to HTTP statuses, a body `{"error": "..."}`). The model
repository and shared-memory extensions take the gRPC servicer's path into the
engine: the same checks (kserve_repository, kserve_convert's region rules,
register only from this host), the same engine calls.

Why aiohttp: it is an asyncio server (no second event loop or thread: it runs
on uvloop beside grpc.aio, and its handlers await the engine directly), its
HTTP parser is C (llhttp), it keeps connections alive, cancels a handler whose
client went away, bounds request bodies, decompresses gzip/deflate bodies and
compresses responses on request. An ASGI stack (Starlette under uvicorn) adds
a layer of per-request dispatch over the same kind of parser; granian runs
its own runtime beside ours. docs/protocols.md gives the measurements.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, PayloadEncodingError

from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.service import auth, echo
from trtserve.service.config import SharedMemoryConfig
from trtserve.service.engine.api import CUDA, SYSTEM, Engine, InferRequest, now
from trtserve.service.errors import NotFound, ResourceExhausted
from trtserve.service.frontends import kserve_json as kjson
from trtserve.service.frontends import kserve_model_config as describe
from trtserve.service.frontends import kserve_repository as repository
from trtserve.service.frontends.common import (
    answered_by,
    check_inputs,
    is_loopback_host,
    require_local,
)
from trtserve.service.frontends.errors import http_status_of
from trtserve.service.frontends.http_guard import DEFAULT_LIMITS, ConnectionGuard, HttpLimits
from trtserve.service.frontends.kserve import EXTENSIONS, SERVER_NAME, Unimplemented
from trtserve.service.frontends.unsent import UnsentAnswers, expected_answer_bytes
from trtserve.service.version import version

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Beyond the gRPC form's: the binary-tensor extension is HTTP's alone.
HTTP_EXTENSIONS = (*EXTENSIONS, "binary_tensor_data")
# Answers smaller than this are never compressed.
COMPRESS_FROM_BYTES = 1024
# Connections the kernel queues for accepting (aiohttp's TCPSite default is 128).
LISTEN_BACKLOG = 1024
# Bodies of the repository and shared-memory requests: a few fields. Larger ones are
# refused (413) before they are parsed, which would hold the event loop.
MAX_CONTROL_BODY_BYTES = 64 * 1024
# Paths answered without the token unless server.health_requires_auth.
_HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")


def _json(value: object, status: int = 200) -> web.Response:
    return web.Response(body=kjson.dumps(value), status=status, content_type=kjson.JSON_TYPE)


def error_response(status: int, message: str) -> web.Response:
    response = web.Response(body=kjson.error_body(message), status=status,
                            content_type=kjson.JSON_TYPE)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


class KServeHttp:
    """The REST API's handlers over one engine."""

    def __init__(self, engine: Engine, server_ready: Callable[[], bool] | None = None,
                 token: str | None = None, health_requires_auth: bool = False,
                 max_request_bytes: int = 256 * 1024 * 1024,
                 max_response_bytes: int = 256 * 1024 * 1024,
                 body_timeout_s: float = DEFAULT_LIMITS.body_timeout_s,
                 shared_memory: SharedMemoryConfig | None = None,
                 max_json_bytes: int = 8 * 1024 * 1024,
                 unsent: UnsentAnswers | None = None) -> None:
        self._engine = engine
        # Answers running or not read yet, by connection: shared with the gRPC services.
        self._unsent = unsent or UnsentAnswers()
        # The JSON part of an inference body (all of it without the binary extension).
        # json.loads and the lists' conversion hold the GIL throughout (about 0.5 s for
        # 8 MiB of "0," here), so a larger part would stop every other request of this
        # process, and a gzip body of a few kilobytes can inflate to hundreds of MiB.
        self._max_json_bytes = max_json_bytes
        # The longest wait for the next bytes of a request's body.
        self._body_timeout_s = body_timeout_s
        self._shared_memory = shared_memory or SharedMemoryConfig()
        # Whether the server has finished starting and is not draining.
        self._server_ready = server_ready or (lambda: True)
        self._token = auth.BearerToken(token) if token is not None else None
        self._open_health = not health_requires_auth
        self._max_request_bytes = max_request_bytes
        self._max_response_bytes = max_response_bytes
        self._version = version()

    def app(self) -> web.Application:
        # aiohttp refuses bodies above client_max_size while reading them (413).
        app = web.Application(client_max_size=self._max_request_bytes,
                              middlewares=[self._errors, self._auth])
        get, post = web.get, web.post
        versioned = ("/v2/models/{model}", "/v2/models/{model}/versions/{version}")
        app.add_routes([
            get("/v2/health/live", self.live),
            get("/v2/health/ready", self.ready),
            get("/v2", self.server_metadata),
            get("/v2/models/stats", self.statistics),
            *(get(f"{base}/ready", self.model_ready) for base in versioned),
            *(get(f"{base}/config", self.model_config) for base in versioned),
            *(get(f"{base}/stats", self.statistics) for base in versioned),
            *(post(f"{base}/infer", self.infer) for base in versioned),
            *(get(base, self.model_metadata) for base in versioned),
            post("/v2/repository/index", self.repository_index),
            post("/v2/repository/models/{model}/load", self.load_model),
            post("/v2/repository/models/{model}/unload", self.unload_model),
            *self._region_routes("/v2/systemsharedmemory", SYSTEM),
            *self._region_routes("/v2/cudasharedmemory", CUDA),
            *(web.route("*", path, _unimplemented(why)) for path, why in _NOT_IMPLEMENTED),
        ])
        return app

    # --- middleware --------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every error as KServe's `{"error": ...}` with the status the gRPC code maps to."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            # aiohttp's own answers (no route, wrong method, body too large) in our form.
            response = error_response(e.status,
                                      _http_problem(e, request, self._max_request_bytes))
            if e.status == 408:  # the rest of a stalled body is not waited for
                return await _sent_then_closed(response, request)
            return response
        except (web.RequestPayloadError, PayloadEncodingError) as e:
            # A body its Content-Encoding (or chunking) cannot decode: the client's
            # mistake, not ours (it was a 500 with two tracebacks logged). What is left of
            # the body cannot be read, so the connection goes with the answer.
            reason = re.sub(r"^\d+, message: ", "", " ".join(str(e).split()))
            return await _sent_then_closed(error_response(
                400, f"the request's body could not be decoded ({echo.text(reason)}); check "
                "its Content-Encoding"), request)
        except Exception as e:
            status, message = http_status_of(e)
            return error_response(status, message)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is None or (self._open_health and request.path in _HEALTH_PATHS):
            return await handler(request)
        problem = self._token.problem(request.headers.get("Authorization"))
        if problem:
            return error_response(401, auth.HTTP_MESSAGES[problem])
        return await handler(request)

    # --- health ------------------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        # As KServe defines health answers: 200 true, 4xx false (Triton: 400).
        if self._server_ready() and self._engine.ready(None):
            return web.Response(status=200)
        return error_response(400, "the server is not ready: models are loading, or it "
                              "is draining")

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = _names(request)
        try:
            self._engine.describe(model, version)
            ready = self._engine.ready(model)
        except NotFound as e:
            return error_response(400, str(e))
        if ready:
            return web.Response(status=200)
        return error_response(400, f"model '{echo.text(model)}' is not ready")

    # --- metadata, configuration, statistics -------------------------------------------

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": self._version,
                      "extensions": list(HTTP_EXTENSIONS)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = self._engine.describe(*_names(request))
        return _json(kjson.message_json(describe.model_metadata(model)))

    async def model_config(self, request: web.Request) -> web.Response:
        # Triton answers the configuration itself, not wrapped in {"config": ...}.
        model = self._engine.describe(*_names(request))
        return _json(kjson.message_json(describe.model_config(model)))

    async def statistics(self, request: web.Request) -> web.Response:
        name = request.match_info.get("model")
        version = request.match_info.get("version", "")
        if name is not None:
            self._engine.describe(name, version)
        snapshot = await self._engine.stats(name)
        stats = [kjson.message_json(describe.model_statistics(m)) for m in snapshot.models]
        return _json({"model_stats": stats})

    # --- model repository (frontends/kserve_repository.py, as the gRPC RPCs) -------------

    async def repository_index(self, request: web.Request) -> web.Response:
        body = kjson.body_object(await self._control_body(request),
                                 "the repository index request")
        index = repository.index(await self._engine.repository_index(), kjson.index_ready(body))
        # Triton's HTTP form answers the list itself.
        return _json([kjson.message_json(m) for m in index.models])

    async def load_model(self, request: web.Request) -> web.Response:
        rpc = "RepositoryModelLoad"
        model = request.match_info["model"]
        repository.check_name(rpc, model)
        body = kjson.body_object(await self._control_body(request), "the load request")
        path = repository.load_path(kjson.repository_parameters(body, rpc))
        await self._engine.load_model(model, path)
        return web.Response(status=200)

    async def unload_model(self, request: web.Request) -> web.Response:
        rpc = "RepositoryModelUnload"
        model = request.match_info["model"]
        repository.check_name(rpc, model)
        body = kjson.body_object(await self._control_body(request), "the unload request")
        repository.check_unload(kjson.repository_parameters(body, rpc))
        await self._engine.unload_model(model)
        return web.Response(status=200)

    # --- shared memory (Triton's system and CUDA shared-memory extensions) --------------

    def _region_routes(self, base: str, kind: str) -> list[web.RouteDef]:
        status, unregister = self._region_status(kind), self._unregister(kind)
        register = self._register_system if kind == SYSTEM else self._register_cuda
        # Triton's clients GET the status; POST is taken too, as the extension's text has it.
        return [
            *(web.route(method, path, status) for method in ("GET", "POST")
              for path in (f"{base}/status", f"{base}/region/{{region}}/status")),
            web.post(f"{base}/region/{{region}}/register", register),
            web.post(f"{base}/unregister", unregister),
            web.post(f"{base}/region/{{region}}/unregister", unregister),
        ]

    def _local_only(self, request: web.Request, rpc: str) -> None:
        # The HTTP port is TCP only: the caller is local when it comes over loopback.
        require_local(is_loopback_host(request.remote),
                      self._shared_memory.allow_remote_register, rpc)

    async def _register_system(self, request: web.Request) -> web.Response:
        self._local_only(request, "SystemSharedMemoryRegister")
        body = kjson.body_object(await self._control_body(request), "the register request")
        key, offset, byte_size = kjson.system_register(body)
        await self._engine.register_system_region(request.match_info["region"], key, offset,
                                                  byte_size)
        return web.Response(status=200)

    async def _register_cuda(self, request: web.Request) -> web.Response:
        self._local_only(request, "CudaSharedMemoryRegister")
        body = kjson.body_object(await self._control_body(request), "the register request")
        raw_handle, device_id, byte_size = kjson.cuda_register(body)
        await self._engine.register_cuda_region(request.match_info["region"], raw_handle,
                                                device_id, byte_size)
        return web.Response(status=200)

    def _unregister(self, kind: str) -> Handler:
        async def unregister(request: web.Request) -> web.Response:
            # No region in the path: every region of the kind.
            await self._engine.unregister_region(request.match_info.get("region"), kind)
            return web.Response(status=200)

        return unregister

    def _region_status(self, kind: str) -> Handler:
        async def status(request: web.Request) -> web.Response:
            regions = await self._engine.region_status(request.match_info.get("region"), kind)
            if kind == SYSTEM:
                return _json([kjson.message_json(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size))
                    for r in regions])
            return _json([kjson.message_json(
                pb.CudaSharedMemoryStatusResponse.RegionStatus(
                    name=r.name, device_id=r.device_id, byte_size=r.byte_size))
                for r in regions])

        return status

    # --- inference ---------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _names(request)
        model = self._engine.describe(name, version)
        connection = self._unsent.connection(lambda: _peer(request))
        connection.check()  # before its body is read: it would not run
        if request.content_length is not None and \
                request.content_length > self._max_request_bytes:
            # Refused from the header, before a byte of the body is read.
            raise web.HTTPRequestEntityTooLarge(max_size=self._max_request_bytes,
                                                actual_size=request.content_length)
        header = request.headers.get(kjson.HEADER_LENGTH)
        if header is None:
            # All JSON: the JSON limit bounds the body as it is read (and inflated).
            try:
                body = await self._read_body(
                    request, min(self._max_request_bytes, self._max_json_bytes))
            except web.HTTPRequestEntityTooLarge:
                if self._max_json_bytes >= self._max_request_bytes:
                    raise
                raise self._json_too_large() from None
            length = None
        else:
            body = await self._read_body(request)
            length = kjson.header_length(header, len(body))
            if length is not None and length > self._max_json_bytes:
                raise self._json_too_large()
        spec = model.spec
        parsed = kjson.parse_infer(body, length,
                                   check=lambda tensors: check_inputs(name, spec, tensors))
        plan = kjson.plan_outputs(parsed, {t.name: t.dtype for t in spec.outputs})
        deadline = now() + parsed.timeout_us / 1e6 if parsed.timeout_us else None
        regions = kjson.output_regions(plan)
        # Again now, with no await until the reservation: requests whose bodies were read
        # side by side all passed the first check before any of them counted.
        connection.check()
        reserved = connection.reserve(
            expected_answer_bytes(spec, parsed.inputs.values(), regions).bytes)
        try:
            result = await answered_by(deadline, self._engine.infer(InferRequest(
                model=name, version=version, inputs=parsed.inputs,
                outputs=tuple(o.name for o in plan), output_regions=regions,
                deadline=deadline)))
        finally:
            if reserved is not None:
                reserved()
        parts, json_length = kjson.encode_infer(parsed.id, result, plan)
        size = sum(len(part) for part in parts)
        if size > self._max_response_bytes:
            # As gRPC refuses a response over max_send_message_bytes.
            raise ResourceExhausted(f"the response ({size} bytes) is larger than the server "
                                    f"sends ({self._max_response_bytes} bytes, "
                                    "server.max_send_message_bytes)")
        response = web.Response(
            body=b"".join(parts),
            content_type=kjson.JSON_TYPE if json_length is None else kjson.BINARY_TYPE)
        if json_length is not None:
            response.headers[kjson.HEADER_LENGTH] = str(json_length)
        if size >= COMPRESS_FROM_BYTES and "Accept-Encoding" in request.headers:
            # gzip or deflate, as the client asks (tritonclient's response_compression).
            # Not below a kilobyte: there it costs more than it saves, and clients such
            # as `requests` and aiohttp ask for it on every request by default.
            response.enable_compression()
        # Held in the ledger until it is written out: a client that does not read keeps
        # it in this process (the transport's buffer) as long as its connection lives.
        release = connection.hold(size)
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away: nothing to answer, nothing to log
        finally:
            if release is not None:
                release()
        return response

    def _json_too_large(self) -> web.HTTPRequestEntityTooLarge:
        return _TooLarge(f"the request's JSON is larger than the server parses "
                         f"({self._max_json_bytes} bytes, server.http_max_json_bytes); send "
                         "large tensors as binary data (Triton's binary tensor extension, "
                         "tritonclient.http's default) or through shared memory")

    async def _control_body(self, request: web.Request) -> bytes:
        """The body of a repository or shared-memory request, at most MAX_CONTROL_BODY_BYTES
        (counted as read, so chunked and compressed bodies are bounded too), under the
        same body timeout as an inference request's (without it a client that sent a
        byte of a control body and stopped held its connection for ever: a few such
        took every place of `http_max_connections`)."""
        limit = MAX_CONTROL_BODY_BYTES
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                                actual_size=request.content_length)
        return await self._read_body(request, limit)

    async def _read_body(self, request: web.Request, limit: int | None = None) -> bytes:
        """The whole body, as `request.read()`, but a client that stops sending it for
        `body_timeout_s` is answered 408 and its connection closed (a body sent a
        byte now and then would otherwise hold its connection and handler forever).
        More than `limit` bytes (default `max_request_bytes`) is 413."""
        limit = self._max_request_bytes if limit is None else limit
        loop = asyncio.get_running_loop()
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self._body_timeout_s) as window:
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                    chunks.append(chunk)
                    window.reschedule(loop.time() + self._body_timeout_s)
        except TimeoutError:
            raise web.HTTPRequestTimeout(
                text=f"no bytes of the request's body came for {self._body_timeout_s:g} s "
                     "(server.http_body_timeout_s)") from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class _MalformedRequestsInOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse (bad chunking, an unknown Content-Encoding,
    smuggling forms) as an ERROR with its traceback, twenty lines a request: any client,
    token or not, could flood the log. It is the client's mistake and aiohttp has
    answered 400: one line, with the address and the reason."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.msg = f"{record.getMessage()}: {' '.join(str(error).split())}"
            record.args = None
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_MALFORMED_IN_ONE_LINE = _MalformedRequestsInOneLine()


async def _sent_then_closed(response: web.Response, request: web.Request) -> web.Response:
    """`response`, sent, then its connection closed, for a body that will not be read to
    its end: with only the response's own force_close, aiohttp lingered 10 s reading the
    rest (the connection holding its place of http_max_connections), and a body that
    cannot be decoded raised again there, logged as an unhandled exception."""
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def _names(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


class _TooLarge(web.HTTPRequestEntityTooLarge):
    """A 413 that says which limit it met (aiohttp's own name only the body's)."""

    def __init__(self, problem: str) -> None:
        super().__init__(max_size=0, actual_size=0)
        self.problem = problem


def _peer(request: web.Request) -> str:
    """The connection a request came on, as the unsent ledger names it."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"http:{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"http:{peer}"


def _http_problem(error: web.HTTPException, request: web.Request, max_bytes: int) -> str:
    if isinstance(error, _TooLarge):
        return error.problem
    if error.status == 404:
        return f"no such endpoint: {echo.text(request.path)}"
    if error.status == 405:
        return f"{request.method} is not allowed on {echo.text(request.path)}"
    if error.status == 408:
        return error.text or error.reason
    if error.status == 413 and not request.path.startswith("/v2/models/"):
        return (f"the request body is larger than this endpoint accepts "
                f"({MAX_CONTROL_BODY_BYTES} bytes)")
    if error.status == 413:
        return (f"the request body is larger than the server accepts ({max_bytes} bytes, "
                "server.max_receive_message_bytes)")
    return error.reason


def _unimplemented(why: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        raise Unimplemented(f"{request.path} is not implemented by trtserve: {why}")

    return handler


_NOT_IMPLEMENTED = (
    ("/v2/trace/setting", "tracing is not supported; use the Stats RPC and Prometheus metrics"),
    ("/v2/models/{model}/trace/setting",
     "tracing is not supported; use the Stats RPC and Prometheus metrics"),
    ("/v2/logging", "log settings are set at start (command line and configuration)"),
)


class HttpServer:
    """The REST API on `host:port`: started after gRPC binds, stopped after it drains.

    Connections and the time a client may take over its headers are bounded
    (service/frontends/http_guard.py). With `reuse_port` the port is shared with the
    server's other frontend processes (SO_REUSEPORT; the kernel spreads connections).
    """

    def __init__(self, api: KServeHttp, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False,
                 limits: HttpLimits = DEFAULT_LIMITS) -> None:
        # handler_cancellation: a client that hangs up cancels its request, as in gRPC.
        self._runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None,
                                     keepalive_timeout=limits.keepalive_timeout_s)
        self._host, self._port = host, port
        self._ssl = ssl_context
        self._reuse_port = reuse_port
        self.limits = limits
        self.guard: ConnectionGuard | None = None
        self._listener: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        # Once per process however many servers start (addFilter skips one it holds).
        logging.getLogger("aiohttp.server").addFilter(_MALFORMED_IN_ONE_LINE)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self.limits)
        try:
            # What aiohttp's TCPSite does, with the guard as the protocol factory.
            self._listener = await asyncio.get_running_loop().create_server(
                self.guard, self._host or None, self._port, ssl=self._ssl,
                ssl_handshake_timeout=self.limits.header_timeout_s if self._ssl else None,
                backlog=LISTEN_BACKLOG, reuse_address=True, reuse_port=self._reuse_port)
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = int(self._listener.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening, then close the connections (a request still being answered
        gets the runner's shutdown timeout)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await self._runner.cleanup()
