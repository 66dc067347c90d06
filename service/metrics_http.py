"""The Prometheus endpoint's HTTP server: one thread, bounded connections and time.

It runs in the metrics process (service/metrics_child.py), never in the server.
Why not prometheus_client's own server (`start_http_server`, which this
replaced): it is a ThreadingWSGIServer, one thread per connection and no
timeouts, so 1,000 half-sent requests made 1,000 threads, and when they
completed every one of them rendered at once and stalled inference for
15 s (issue 15). No HTTP server among our dependencies has a header timeout and
a connection cap (adding aiohttp or uvicorn for one GET did not pay); a scrape
is one GET, so this is asyncio's stream server, one event loop, with:

- at most `max_connections` connections held; one more is answered 503 and
  closed at once, so a flood costs a socket each, briefly, never a thread;
- `timeout_s` to send a request's headers (a half-sent request is closed),
  to take the response, and for an idle keep-alive connection; the TLS
  handshake has the same bound;
- headers of at most 8 KiB (more: 431 and closed);
- one render shared by every scrape within `render_interval_s` (`Exposition`),
  so N scrapers cost the serving loop one short read per interval, not N.

The one render per interval is the server's only share of a scrape.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import logging
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 8192
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
PATH = "/metrics"


@dataclass(frozen=True)
class ScrapeLimits:
    """How much of this process one scraper, or all of them, can hold."""

    max_connections: int = 16
    timeout_s: float = 5.0  # headers in, response out, idle keep-alive, TLS handshake
    render_interval_s: float = 1.0  # scrapes within it share one render; 0: every scrape


@dataclass(frozen=True)
class Rendered:
    text: bytes
    gzipped: bytes


class RenderError(Exception):
    """The exposition could not be rendered (the serving loop did not answer in time)."""


class Exposition:
    """The metrics text, rendered at most once per `interval_s`; concurrent scrapes share it.

    Lives on the metrics thread's loop. `render` does the work (it reads the
    serving loop's state there); a scrape that arrives while a render is in
    flight waits for that one instead of starting another.
    """

    def __init__(self, render: Callable[[], Awaitable[bytes]], interval_s: float,
                 timeout_s: float) -> None:
        self._render = render
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._cached: Rendered | None = None
        self._rendered_at = 0.0
        self._in_flight: asyncio.Future[Rendered] | None = None
        self.renders = 0  # how many renders ran (for tests and the storm benchmark)

    async def get(self) -> Rendered:
        now = time.monotonic()
        if self._cached is not None and now - self._rendered_at < self._interval_s:
            return self._cached
        if self._in_flight is None:
            self._in_flight = asyncio.ensure_future(self._fresh(now))
            self._in_flight.add_done_callback(self._clear)
        # shield: one scraper giving up must not cancel the render others wait for.
        return await asyncio.shield(self._in_flight)

    def _clear(self, future: asyncio.Future[Rendered]) -> None:
        self._in_flight = None
        if not future.cancelled():
            future.exception()  # retrieved: a failed render is reported to each waiter

    async def _fresh(self, started: float) -> Rendered:
        self.renders += 1
        try:
            text = await asyncio.wait_for(self._render(), self._timeout_s)
        except TimeoutError:
            raise RenderError(f"the server's stats were not read within "
                              f"{self._timeout_s:g} s") from None
        rendered = Rendered(text, gzip.compress(text, compresslevel=5))
        self._cached, self._rendered_at = rendered, started
        return rendered


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    keep_alive: bool
    headers: dict[str, str]


class _BadRequest(Exception):
    def __init__(self, status: HTTPStatus, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _parse(head: bytes) -> _Request:
    """The request line and headers of one HTTP/1.x request (a GET: no body)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "undecodable request") from None
    line, *lines = text.rstrip("\r\n").split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    headers: dict[str, str] = {}
    for raw in lines:
        name, colon, value = raw.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "malformed header")
        headers[name.lower()] = value.strip()
    # A body would be read as the next request: refuse any (a scrape has none).
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "a scrape request has no body")
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" \
        else "keep-alive" in connection
    return _Request(method, target.split("?", 1)[0], keep_alive, headers)


def _response(status: HTTPStatus, body: bytes, *, keep_alive: bool,
              extra: tuple[tuple[bytes, bytes], ...] = (), head_only: bool = False) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status.value, status.phrase.encode()),
             b"Content-Length: %d" % len(body),
             b"Connection: " + (b"keep-alive" if keep_alive else b"close"),
             *(name + b": " + value for name, value in extra)]
    if not extra or all(name != b"Content-Type" for name, _ in extra):
        lines.append(b"Content-Type: text/plain; charset=utf-8")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body)


def _plain(status: HTTPStatus, message: str, *, keep_alive: bool = False,
           extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    return _response(status, message.encode() + b"\n", keep_alive=keep_alive, extra=extra)


BUSY = _plain(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections to the metrics endpoint")


def bind(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        info = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_PASSIVE)
        family, _, _, _, address = info[0]
        return socket.create_server(address, family=family, backlog=backlog)
    except OSError as e:
        raise OSError(e.errno, f"metrics endpoint: cannot listen on {host}:{port}: "
                               f"{e.strerror}") from None


def _digest(value: bytes) -> bytes:
    # As service/auth.py compares gRPC tokens (that module imports grpc, which this
    # process has no other use for): SHA-256 digests in constant time.
    return hashlib.sha256(value).digest()


def bearer_matches(header: str, expected_digest: bytes) -> bool:
    """An `Authorization` value is `Bearer <token>` with the expected token."""
    scheme, _, token = header.strip().partition(" ")
    given = _digest(token.strip().encode("latin-1", "replace"))
    return hmac.compare_digest(given, expected_digest) and scheme.lower() == "bearer"


class ScrapeServer:
    """Serves `GET /metrics` from `render` on `sock`, on the running event loop."""

    def __init__(self, sock: socket.socket, render: Callable[[], Awaitable[bytes]],
                 limits: ScrapeLimits, *, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._sock = sock
        self._limits = limits
        self._token_digest = None if token is None else _digest(token.encode())
        self._ssl = ssl_context
        self.exposition = Exposition(render, limits.render_interval_s, limits.timeout_s)
        self.open_connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> asyncio.Server:
        return await asyncio.start_server(
            self._connection, sock=self._sock, limit=MAX_HEADER_BYTES, ssl=self._ssl,
            ssl_handshake_timeout=self._limits.timeout_s if self._ssl else None)

    async def close(self, server: asyncio.Server) -> None:
        """Stop listening and drop every open connection."""
        server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        if self.open_connections >= self._limits.max_connections:
            writer.write(BUSY)  # a few bytes: the socket's buffer takes them at once
            writer.close()
            return
        self.open_connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._requests(reader, writer)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass  # the peer went away or stalled: nothing to answer
        except Exception:
            log.exception("metrics endpoint: unexpected error")
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.transport.abort()

    async def _requests(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until it closes, errs or idles out."""
        timeout_s = self._limits.timeout_s
        while True:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError:
                await self._send(writer, _plain(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                                f"request headers over {MAX_HEADER_BYTES} "
                                                "bytes"))
                return
            try:
                request = _parse(head)
            except _BadRequest as e:
                await self._send(writer, _plain(e.status, str(e)))
                return
            response = await self._answer(request)
            await self._send(writer, response)
            if not request.keep_alive:
                return

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), self._limits.timeout_s)

    async def _answer(self, request: _Request) -> bytes:
        keep = request.keep_alive
        if request.method not in ("GET", "HEAD"):
            return _plain(HTTPStatus.METHOD_NOT_ALLOWED, "only GET and HEAD", keep_alive=keep,
                          extra=((b"Allow", b"GET, HEAD"),))
        if request.path != PATH:
            return _plain(HTTPStatus.NOT_FOUND, f"metrics are at {PATH}", keep_alive=keep)
        if self._token_digest is not None and not bearer_matches(
                request.headers.get("authorization", ""), self._token_digest):
            return _plain(HTTPStatus.UNAUTHORIZED, "missing or invalid bearer token: send "
                          "'Authorization: Bearer <token>'", keep_alive=keep,
                          extra=((b"WWW-Authenticate", b'Bearer realm="trtserve metrics"'),))
        try:
            rendered = await self.exposition.get()
        except RenderError as e:
            return _plain(HTTPStatus.SERVICE_UNAVAILABLE, str(e), keep_alive=keep)
        except Exception:
            log.exception("metrics endpoint: rendering failed")
            return _plain(HTTPStatus.INTERNAL_SERVER_ERROR, "rendering the metrics failed",
                          keep_alive=keep)
        gzipped = "gzip" in request.headers.get("accept-encoding", "").lower()
        body = rendered.gzipped if gzipped else rendered.text
        extra = ((b"Content-Type", CONTENT_TYPE),
                 *(((b"Content-Encoding", b"gzip"),) if gzipped else ()))
        return _response(HTTPStatus.OK, body, keep_alive=keep, extra=extra,
                         head_only=request.method == "HEAD")
