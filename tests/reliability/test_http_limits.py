"""What HTTP clients can hold of the server: connections and time (service/frontends/http_guard.py).

Raw sockets over loopback against a real server: a client that sends its
headers one byte a second is answered 408 and closed after
`http_header_timeout_s`, on its first request and on a later one of the same
connection; a TLS handshake that never comes is closed as well; an idle
connection is closed after `http_keepalive_timeout_s`; connection N+1 over
`http_max_connections` is answered 503 and closed while the N held keep
working; a body that stops coming is answered 408 after `http_body_timeout_s`.
Timeouts are set extreme (1-2 s against requests that would take tens of
seconds to send), so no assertion depends on the machine's speed.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.certs import authority
from trtserve.service.config import ModelConfig, ServerConfig, TlsConfig
from trtserve.service.errors import ConfigError
from trtserve.service.testing.servers import ServerThread, free_port, running_server, server_config

# A request whose headers take SLOW_REQUEST_BYTES seconds to send at a byte a second.
SLOW_REQUEST = (b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"User-Agent: one byte a second\r\n\r\n")
LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture(scope="module")
def model(example_onnx: Path) -> ModelConfig:
    return ModelConfig(name="example", path=str(example_onnx), workers=1)


def _serve(model: ModelConfig, **server: Any) -> Iterator[ServerThread]:
    return running_server(server_config(model, http_port=free_port(), **server))


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer (headers and a Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside an answer"
        body += chunk
    return head


def _until_closed(sock: socket.socket, timeout_s: float = 30) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _drip(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Send `request` a byte a second until the server answers or closes; returns how
    many bytes went and what came back (b"" if the whole request went unanswered)."""
    sock.settimeout(1.0)  # the pause between bytes: waiting for the server's answer
    for sent in range(1, len(request) + 1):
        try:
            sock.sendall(request[sent - 1:sent])
            got = sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return sent, b""
        return sent, got + _until_closed(sock)
    return len(request), b""


def test_headers_sent_a_byte_a_second_are_cut_off(model: ModelConfig) -> None:
    with _serve(model, http_header_timeout_s=2, http_keepalive_timeout_s=3600) as s:
        with _connect(s.server.http_port) as slow:
            sent, got = _drip(slow, SLOW_REQUEST)
        # Answered 408 and closed long before the headers could be complete.
        assert sent < len(SLOW_REQUEST) - 10, (sent, got)
        assert got.startswith(b"HTTP/1.1 408 Request Timeout"), got
        assert b"server.http_header_timeout_s" in got
        # A client that sends its request at once is served as ever.
        with _connect(s.server.http_port) as quick:
            quick.sendall(LIVE)
            assert _answer(quick).startswith(b"HTTP/1.1 200")


def test_the_header_timeout_holds_for_every_request_of_a_connection(
        model: ModelConfig) -> None:
    with _serve(model, http_header_timeout_s=2, http_keepalive_timeout_s=3600) as s, \
            _connect(s.server.http_port) as sock:
        for _ in range(3):  # kept alive: requests that came whole
            sock.sendall(LIVE)
            assert _answer(sock).startswith(b"HTTP/1.1 200")
        sent, got = _drip(sock, SLOW_REQUEST)
        assert sent < len(SLOW_REQUEST) - 10, (sent, got)
        assert got.startswith(b"HTTP/1.1 408"), got


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(
        model: ModelConfig) -> None:
    with _serve(model, http_keepalive_timeout_s=1) as s, _connect(s.server.http_port) as sock:
        sock.sendall(LIVE)
        assert _answer(sock).startswith(b"HTTP/1.1 200")
        assert _until_closed(sock, timeout_s=30) == b""  # closed, not held for an hour


def test_a_tls_handshake_that_never_comes_is_closed(model: ModelConfig,
                                                    tmp_path: Path) -> None:
    ca = authority("trtserve test CA")
    cert, key = ca.issue("trtserve test server", server=True).write(tmp_path, "server")
    tls = TlsConfig(cert_file=str(cert), key_file=str(key))
    with _serve(model, tls=tls, http_header_timeout_s=1) as s:
        with _connect(s.server.http_port) as silent:
            assert _until_closed(silent, timeout_s=30) == b""
        context = ssl.create_default_context(cadata=ca.pem.decode())
        with _connect(s.server.http_port) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
            sock.sendall(LIVE)
            assert _answer(sock).startswith(b"HTTP/1.1 200")


def test_a_connection_over_the_cap_is_refused_and_the_others_keep_working(
        model: ModelConfig) -> None:
    cap = 3
    with _serve(model, http_max_connections=cap) as s:
        port = s.server.http_port
        held = [_connect(port) for _ in range(cap)]
        try:
            for sock in held:  # each established and answered: counted
                sock.sendall(LIVE)
                assert _answer(sock).startswith(b"HTTP/1.1 200")
            for _ in range(3):
                with _connect(port) as extra:
                    extra.sendall(LIVE)
                    got = _until_closed(extra)
                assert got.startswith(b"HTTP/1.1 503 Service Unavailable"), got
                assert b"server.http_max_connections" in got
            for sock in held:  # the held ones were not disturbed
                sock.sendall(LIVE)
                assert _answer(sock).startswith(b"HTTP/1.1 200")
            # One closed: its place is free again (once the server has seen it go).
            held.pop().close()
            deadline = time.monotonic() + 30
            while True:
                with _connect(port) as again:
                    again.sendall(LIVE)
                    head = _first(again)
                if head.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert head.startswith(b"HTTP/1.1 200"), head
        finally:
            for sock in held:
                sock.close()


def _first(sock: socket.socket) -> bytes:
    """The first bytes the server answers (an answer's status line and more)."""
    sock.settimeout(10)
    return sock.recv(65536)


@pytest.mark.parametrize(("key", "value"), [
    ("http_max_connections", 0), ("http_header_timeout_s", 0),
    ("http_keepalive_timeout_s", -1.0), ("http_header_timeout_s", 7200),
    ("http_body_timeout_s", 0)])
def test_limits_out_of_range_are_refused_naming_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"server\.{key}: got {value}"):
        ServerConfig(**{key: value})


@pytest.mark.parametrize("path", [
    "/v2/models/example/infer", "/v2/repository/index", "/v2/repository/models/example/load",
    "/v2/systemsharedmemory/region/x/register"])
def test_a_body_that_stops_coming_is_cut_off(model: ModelConfig, path: str) -> None:
    """Headers whole, then part of the body and nothing more: 408 and closed after
    `http_body_timeout_s` (not held until the keep-alive or header timeouts, an hour).
    Before: the control endpoints read their bodies with no timeout at all (a few such
    clients took every place of http_max_connections, found by an adversarial run), and
    after a 408 aiohttp lingered 10 s more reading the body."""
    with _serve(model, http_body_timeout_s=1, http_header_timeout_s=3600,
                http_keepalive_timeout_s=3600) as s, _connect(s.server.http_port) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"inputs": [' % path.encode())
        start = time.monotonic()
        got = _until_closed(sock, timeout_s=60)
        assert time.monotonic() - start < 5, "closed long after the body timeout"
    assert got.startswith(b"HTTP/1.1 408"), got
    assert b"server.http_body_timeout_s" in got
    assert b"Connection: close" in got


def test_a_body_sent_in_pieces_within_the_timeout_is_served(model: ModelConfig) -> None:
    """The body timeout is a wait between bytes, not a bound on the whole body."""
    import json

    import numpy as np

    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                   "data": [0.5] * 64}]}).encode()
    with _serve(model, http_body_timeout_s=3) as s, _connect(s.server.http_port) as sock:
        sock.sendall(b"POST /v2/models/example/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        pieces = np.array_split(np.frombuffer(body, np.uint8), 8)
        for piece in pieces:  # 0.5 s apart: 3.5 s in all, longer than the timeout
            sock.sendall(piece.tobytes())
            time.sleep(0.5)
        assert _answer(sock).startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_body_its_content_encoding_cannot_decode_is_400_in_one_log_line(
        model: ModelConfig, encoding: str, caplog: pytest.LogCaptureFixture) -> None:
    """The client's mistake: 400 naming the encoding, the connection closed (the rest of
    the body cannot be read), and no traceback in the log. Before: a corrupt gzip or
    deflate body, or br, was 500 "internal error" with two tracebacks logged, and any
    malformed request aiohttp itself refuses (zstd here) logged twenty lines of ERROR,
    which any client, token or not, could repeat (found by an adversarial run)."""
    body = b"this is not what the header says"
    with _serve(model) as s:
        for path in ("/v2/models/example/infer", "/v2/repository/index"):
            with _connect(s.server.http_port) as sock:
                sock.sendall(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Encoding: %s\r\n"
                             b"Content-Length: %d\r\n\r\n%s"
                             % (path.encode(), encoding.encode(), len(body), body))
                got = _until_closed(sock, timeout_s=10)
            assert got.startswith(b"HTTP/1.") and b" 400 " in got[:20], got
            assert b"Can not decode content-encoding" in got, got
    assert not [r for r in caplog.records if r.exc_info], \
        [r.getMessage() for r in caplog.records if r.exc_info]
