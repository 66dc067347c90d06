"""The metrics endpoint under abuse: half-sent requests, idle connections, floods, and
where it binds; its bearer token and TLS. Real sockets, every wait bounded.

Issue 15: 1,000 half-sent `GET /metrics` requests made 1,014 server threads, and when
they completed, inference and health timed out for 15-17 s; idle connections held a
thread each forever; the port bound the gRPC `--host`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import http.client
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import numpy as np
import psutil
import pytest

from tests.reliability.certs import authority
from tests.reliability.harness import SERVING, health_status
from trtserve.client import Client
from trtserve.service.config import ModelConfig, ServerConfig, TlsConfig
from trtserve.service.engine.local import LocalEngine
from trtserve.service.engine.repository import ModelRepository
from trtserve.service.errors import ConfigError
from trtserve.service.metrics import start_metrics
from trtserve.service.testing.servers import (
    ServerProcess,
    ServerThread,
    free_port,
    running_server,
    server_config,
)

TOKEN = "metrics-Token_0123.~+/="
HALF_SENT = b"GET /metrics HTTP/1.1\r\nHost: trtserve\r\n"  # no blank line: never ends
X = np.ones((2, 64), np.float32)


@contextmanager
def serving(example_onnx, **server: object) -> Iterator[tuple[ServerThread, int]]:
    """The example model on a free port, with metrics on another free port."""
    metrics_port = free_port()
    config = server_config(ModelConfig(name="example", path=str(example_onnx), workers=1),
                           metrics_port=metrics_port, **server)
    with running_server(config) as s:
        yield s, metrics_port


def get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None,
        method: str = "GET", context: ssl.SSLContext | None = None,
        ) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection = http.client.HTTPSConnection(
        "127.0.0.1", port, timeout=10, context=context) if context else \
        http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def inference_and_health_answer(url: str) -> None:
    """One inference and one health check, each within 5 s (a stall fails them)."""
    with Client(url) as c:
        assert c.infer("example", {"input": X}, timeout=5)["output"].shape == (2, 16)
    with grpc.insecure_channel(url) as channel:
        assert health_status(channel, "example") == SERVING


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closed `sock` (EOF or reset) within `within_s` seconds."""
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass  # a response first (408, 503) is fine; the close is what counts
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


# --- bounded threads and connections -------------------------------------------------


def test_half_sent_requests_hold_no_threads_and_inference_and_health_keep_answering(
        example_onnx):
    max_connections = 8
    with serving(example_onnx, metrics_max_connections=max_connections,
                 metrics_timeout_s=60.0) as (s, port):
        baseline = threading.active_count()
        socks = []
        try:
            for _ in range(250):
                sock = connect(port)
                sock.sendall(HALF_SENT)
                socks.append(sock)
            # The old server made a thread per connection as it accepted them; watch
            # for 2 s (or until that has plainly happened).
            most, until = baseline, time.monotonic() + 2.0
            while time.monotonic() < until and most <= baseline + 50:
                most = max(most, threading.active_count())
                time.sleep(0.05)
            assert most <= baseline + 1, f"{most - baseline} threads for 250 half-sent requests"
            inference_and_health_answer(s.url)
            metrics = s.server._metrics
            assert metrics is not None
            # The scrapes are served by a process of their own, one thread.
            assert psutil.Process(metrics.proc.pid).num_threads() == 1

            # Now every one of them completes at once.
            for sock in socks:
                with contextlib.suppress(OSError):  # refused (503, closed) when it connected
                    sock.sendall(b"\r\n")
            inference_and_health_answer(s.url)
            answered = refused = 0
            for sock in socks:
                sock.settimeout(10)
                try:
                    head = sock.recv(64)
                except OSError:
                    head = b""
                answered += head.startswith(b"HTTP/1.1 200")
                refused += head.startswith(b"HTTP/1.1 503") or not head
            assert (answered, refused) == (max_connections, 250 - max_connections)
            # Eight scrapes at once cost the serving loop one render.
            assert metrics.renders == 1
            assert threading.active_count() <= baseline + 1
            assert psutil.Process(metrics.proc.pid).num_threads() == 1
        finally:
            for sock in socks:
                sock.close()


def test_idle_and_half_sent_connections_are_closed_after_the_timeout(example_onnx):
    with serving(example_onnx, metrics_timeout_s=0.2) as (_, port):
        idle, half = connect(port), connect(port)
        half.sendall(HALF_SENT)
        try:
            assert closed_by_server(idle, within_s=10), "an idle connection stayed open"
            assert closed_by_server(half, within_s=10), "a half-sent request stayed open"
            status, _, _ = get(port)  # and the endpoint still serves
            assert status == 200
        finally:
            idle.close()
            half.close()


def test_keep_alive_connections_idle_out_too(example_onnx):
    with serving(example_onnx, metrics_timeout_s=0.2) as (_, port):
        sock = connect(port)
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: trtserve\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 200")
            assert closed_by_server(sock, within_s=10)
        finally:
            sock.close()


def test_connections_past_the_bound_are_answered_503_and_closed(example_onnx):
    with serving(example_onnx, metrics_max_connections=2, metrics_timeout_s=60.0) as (_, port):
        held = [connect(port), connect(port)]
        try:
            status, _, body = get(port)
            assert status == 503 and b"too many connections" in body
            held.pop().close()
            deadline = time.monotonic() + 10
            while (status := get(port)[0]) != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert status == 200, "a freed slot was not reused"
        finally:
            for sock in held:
                sock.close()


# --- where it binds ------------------------------------------------------------------


def test_metrics_bind_loopback_by_default_not_the_grpc_host(example_onnx):
    assert ServerConfig().metrics_host == "127.0.0.1"
    with serving(example_onnx, host="0.0.0.0") as (_, port):
        listening = [c.laddr.ip for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening == ["127.0.0.1"]


def test_metrics_host_is_its_own_setting(example_onnx, caplog):
    with caplog.at_level(logging.WARNING, logger="trtserve.service.metrics"), \
            serving(example_onnx, metrics_host="0.0.0.0") as (_, port):
        listening = [c.laddr.ip for c in psutil.Process().net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening == ["0.0.0.0"]
    assert any("metrics on 0.0.0.0 without a token" in r.getMessage()
               for r in caplog.records)


# --- token and TLS -------------------------------------------------------------------


def test_the_bearer_token_is_required_when_configured(example_onnx, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with serving(example_onnx, auth_token_file=str(token_file),
                 metrics_requires_auth=True) as (_, port):
        status, headers, body = get(port)
        assert status == 401 and "bearer" in headers["www-authenticate"].lower()
        assert b"trtserve_" not in body
        for wrong in (f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer "):
            assert get(port, headers={"Authorization": wrong})[0] == 401, wrong
        status, _, body = get(port, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 200 and b"trtserve_model_requests_total" in body


def test_requiring_the_token_without_one_is_a_config_error(monkeypatch):
    monkeypatch.delenv("TRTSERVE_AUTH_TOKEN", raising=False)
    config = ServerConfig(metrics_port=free_port(), metrics_requires_auth=True)
    with pytest.raises(ConfigError, match="metrics_requires_auth"):
        start_metrics(config, LocalEngine(ModelRepository()))


def test_metrics_over_tls_with_the_servers_certificate(example_onnx, tmp_path):
    ca = authority("metrics test CA")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    cert, key = ca.issue("trtserve", server=True).write(tmp_path, "server")
    tls = TlsConfig(cert_file=str(cert), key_file=str(key))
    with serving(example_onnx, tls=tls, metrics_tls=True) as (_, port):
        trusting = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        status, _, body = get(port, context=trusting)
        assert status == 200 and b"trtserve_model_ready" in body
        with pytest.raises((ssl.SSLError, ConnectionError)):
            get(port, context=ssl.create_default_context())  # does not trust the CA
        plaintext = connect(port)
        try:
            plaintext.sendall(b"GET /metrics HTTP/1.1\r\nHost: trtserve\r\n\r\n")
            assert closed_by_server(plaintext, within_s=10)
        finally:
            plaintext.close()


def test_metrics_tls_needs_the_server_certificate():
    with pytest.raises(ConfigError, match=r"server\.metrics_tls"):
        ServerConfig(metrics_tls=True)


# --- what a scrape gets ----------------------------------------------------------------


def test_bad_requests_get_clear_statuses_and_good_ones_gzip(example_onnx):
    with serving(example_onnx) as (_, port):
        status, _, body = get(port, "/nothing")
        assert status == 404 and b"/metrics" in body
        status, headers, _ = get(port, method="POST")
        assert status == 405 and headers["allow"] == "GET, HEAD"
        sock = connect(port)
        try:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 431")
        finally:
            sock.close()
        sock = connect(port)
        try:
            sock.sendall(b"NONSENSE\r\n\r\n")
            assert sock.recv(64).startswith(b"HTTP/1.1 400")
        finally:
            sock.close()
        status, headers, body = get(port, headers={"Accept-Encoding": "gzip"})
        assert status == 200 and headers["content-encoding"] == "gzip"
        assert b"trtserve_model_ready" in gzip.decompress(body)
        assert headers["content-type"].startswith("text/plain; version=0.0.4")


def test_scrapes_within_the_render_interval_share_one_render(example_onnx):
    with serving(example_onnx, metrics_render_interval_s=60.0) as (s, port):
        answers = [get(port) for _ in range(20)]
        assert [status for status, _, _ in answers] == [200] * 20, answers[0]
        assert len({body for _, _, body in answers}) == 1  # the same text, twenty times
        assert s.server._metrics is not None and s.server._metrics.renders == 1


# --- the metrics process ------------------------------------------------------------


def test_scrapes_run_in_a_lower_priority_process_that_ends_with_the_server(example_onnx):
    with serving(example_onnx) as (s, port):
        metrics = s.server._metrics
        assert metrics is not None
        child = psutil.Process(metrics.proc.pid)
        assert child.ppid() == os.getpid() and child.nice() == os.nice(0) + 10
        assert get(port)[0] == 200
    assert metrics.proc.poll() is not None, "the metrics process outlived the server"


def test_a_metrics_process_that_dies_is_replaced(example_onnx):
    with serving(example_onnx) as (s, port):
        metrics = s.server._metrics
        assert metrics is not None
        first = metrics.proc
        first.kill()
        deadline, status = time.monotonic() + 20, 0
        while time.monotonic() < deadline:
            if metrics.restarts == 1:
                status = get(port)[0]
                break
            time.sleep(0.05)
        assert status == 200 and metrics.proc.pid != first.pid
        inference_and_health_answer(s.url)


def test_the_metrics_process_exits_when_the_server_is_killed(example_onnx):
    metrics_port = free_port()
    server = ServerProcess(["--model", f"example={example_onnx}", "--workers", "1",
                            "--metrics-port", str(metrics_port)])
    try:
        server.wait_ready()
        assert get(metrics_port)[0] == 200
        # The metrics process, and the frontend processes where `frontends` > 1.
        children = psutil.Process(server.proc.pid).children()
        server.proc.kill()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive  # an orphan kept serving
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait()


def test_a_certificate_the_metrics_process_cannot_load_refuses_to_start(tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    config = ServerConfig(metrics_port=free_port(), metrics_tls=True,
                          tls=TlsConfig(cert_file=str(cert), key_file=str(key)))

    async def start() -> None:
        start_metrics(config, LocalEngine(ModelRepository()))

    with pytest.raises(ConfigError, match=r"server\.metrics_tls: cannot load") as err:
        asyncio.run(start())
    assert str(cert) in str(err.value)
