"""Bounds on what HTTP clients can hold of a process: connections and time.

aiohttp has neither a connection cap nor a header timeout. Its keep-alive
timer only closes a connection that sat idle since it opened or since its last
answer, so a client that sends one byte of its headers a second held a
connection (and its handler's task and buffers) for the whole keep-alive
period, an hour by default; and it accepts every connection it is offered, so
a few thousand such clients held a few thousand connections. The metrics port
has both bounds (service/metrics_http.py); this gives the REST port the same:

- at most `max_connections` connections held by this process; one more is
  answered `503` and closed at once, and the ones held keep working;
- `header_timeout_s` to send a request's headers once their first byte came,
  and to finish the TLS handshake; a client that is slower gets `408` and is
  closed;
- `keepalive_timeout_s` for a connection with no request in it (since it
  opened or since its last answer);
- `body_timeout_s`, the longest wait for the next bytes of a request's body
  (KServeHttp reads bodies under it): slower is `408` and closed.

The cap counts connections once they are established (after TLS): a
handshake in progress is bounded by `header_timeout_s` instead. With N
frontend processes each holds its own cap (docs/processes.md).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from trtserve.service.frontends import kserve_json as kjson


@dataclass(frozen=True)
class HttpLimits:
    """What HTTP clients may hold of one process."""

    max_connections: int = 1024
    header_timeout_s: float = 10.0  # request headers, from their first byte; TLS handshake
    keepalive_timeout_s: float = 60.0  # a connection with no request in it
    body_timeout_s: float = 30.0  # the longest wait for the next bytes of a body


DEFAULT_LIMITS = HttpLimits()


def _answer(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, in KServe's error form."""
    body = kjson.error_body(message)
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {kjson.JSON_TYPE}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


BUSY = _answer(503, "Service Unavailable",
               "too many HTTP connections to this server (server.http_max_connections)")


def _timed_out(timeout_s: float) -> bytes:
    return _answer(408, "Request Timeout", f"the request's headers did not arrive within "
                   f"{timeout_s:g} s (server.http_header_timeout_s)")


class ConnectionGuard:
    """Makes aiohttp's protocol for each connection, under `limits`; counts the open ones."""

    def __init__(self, server: web.Server, limits: HttpLimits) -> None:
        self._server = server
        self.limits = limits
        self.open_connections = 0
        self._timed_out = _timed_out(limits.header_timeout_s)

    def __call__(self) -> GuardedRequestHandler:
        # The handler aiohttp would make (web.Server.__call__), with the guard.
        return GuardedRequestHandler(self._server, self, loop=asyncio.get_running_loop(),
                                     **self._server._kwargs)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol, refused over the cap and timed while headers arrive."""

    def __init__(self, server: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._guard = guard
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._guarded_transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if guard.open_connections >= guard.limits.max_connections:
            # Counted here, where the connection is established: checked and counted in
            # one callback, so a burst of connections cannot pass the cap together.
            self._refused = True
            transport.write(BUSY)  # a few bytes: the socket's buffer takes them at once
            transport.close()
            return
        guard.open_connections += 1
        self._guarded_transport = transport
        super().connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        super().data_received(data)
        if self._busy():
            self._cancel_head_timer()
        elif self._head_timer is None:
            # The first bytes of a request's headers: from now on they have the timeout.
            self._arm(self._guard.limits.header_timeout_s)

    def _busy(self) -> bool:
        """A whole request is queued or being answered: its headers are in."""
        return bool(self._messages) or self._request_in_progress

    def _arm(self, delay_s: float) -> None:
        self._head_timer = self._loop.call_later(delay_s, self._head_timeout)

    def _head_timeout(self) -> None:
        self._head_timer = None
        transport = self._guarded_transport
        if self._busy() or transport is None or transport.is_closing():
            return
        if self._waiter is None or self._waiter.done():
            # Between requests inside aiohttp (a request taken but its task not yet
            # started, or an answer being finished): not a client's delay; look again.
            self._arm(min(0.1, self._guard.limits.header_timeout_s))
            return
        # Waiting for a request whose headers began too long ago.
        transport.write(self._guard._timed_out)
        self.force_close()
        transport.close()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._cancel_head_timer()
        self._guard.open_connections -= 1
        self._guarded_transport = None
        super().connection_lost(exc)
