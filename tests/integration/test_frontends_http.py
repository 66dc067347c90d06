"""KServe v2 HTTP/REST with `--frontends 2`: every frontend process serves it on the one port.

Real processes over real sockets, an aiohttp client with one connection per
client (the kernel spreads connections, not requests, over the frontends), and
every answer checked against ONNX Runtime run directly on that request's input.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import onnxruntime as ort
import psutil
import pytest

from service.ipc.codec import INLINE_MAX_BYTES
from trtserve.client import Client
from trtserve.service.testing.servers import ServerProcess, free_port

CLIENTS = 32
REQUESTS_PER_CLIENT = 4
FEATURES = 64
# Rows of each request, in turn: inline in the link, and large enough for the arena.
ROWS = (1, 3, INLINE_MAX_BYTES // (FEATURES * 4) + 7)


def _input(client: int, n: int) -> np.ndarray:
    rows = ROWS[(client + n) % len(ROWS)]
    rng = np.random.default_rng(client * 1000 + n)
    return rng.standard_normal((rows, FEATURES)).astype(np.float32)


def _body(x: np.ndarray) -> dict[str, object]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}]}


def _output(answer: dict[str, object]) -> np.ndarray:
    (out,) = answer["outputs"]  # type: ignore[misc]
    return np.array(out["data"], np.float32).reshape(out["shape"])


class HttpServerProcess(ServerProcess):
    """`trtserve serve --frontends 2` with its HTTP port on."""

    def __init__(self, *args: str) -> None:
        self.http_port = free_port()
        super().__init__([*args, "--frontends", "2", "--http-port", str(self.http_port)])

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="module")
def server(example_onnx: Path) -> HttpServerProcess:
    process = HttpServerProcess("--model", f"example={example_onnx}",
                                "--max-queue-delay-us", "2000", "--http-header-timeout-s", "2")
    with process.serving():
        yield process


def _frontend_pids(server: ServerProcess) -> list[int]:
    pids = []
    for child in psutil.Process(server.proc.pid).children():
        try:
            if "trtserve.service.frontend_process" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:  # gone, or a zombie
            continue
    return pids


def _listeners(port: int, pids: list[int]) -> list[int]:
    """Those of `pids` that listen on `port`."""
    listening = []
    for pid in pids:
        try:
            sockets = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in sockets):
            listening.append(pid)
    return listening


async def _client(url: str, index: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """One connection of its own, REQUESTS_PER_CLIENT requests on it."""
    pairs = []
    async with aiohttp.ClientSession() as session:
        for n in range(REQUESTS_PER_CLIENT):
            x = _input(index, n)
            async with session.post(f"{url}/v2/models/example/infer", json=_body(x)) as r:
                assert r.status == 200, await r.text()
                pairs.append((x, _output(await r.json())))
    return pairs


async def _ready_codes(url: str, connections: int) -> list[int]:
    async def one() -> int:
        async with aiohttp.ClientSession() as session, \
                session.get(f"{url}/v2/health/ready") as r:
            return r.status

    return await asyncio.gather(*(one() for _ in range(connections)))


def test_every_http_answer_is_its_own_across_frontends(server: HttpServerProcess,
                                                       example_onnx: Path) -> None:
    before = Client(server.url).stats()

    async def load() -> list[list[tuple[np.ndarray, np.ndarray]]]:
        return await asyncio.gather(*(_client(server.http_url, i) for i in range(CLIENTS)))

    pairs = [p for pairs in asyncio.run(load()) for p in pairs]
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    assert len(pairs) == CLIENTS * REQUESTS_PER_CLIENT
    for x, y in pairs:
        (want,) = session.run(None, {"input": x})
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    after = Client(server.url).stats()
    (model,), (model_before,) = after.models, before.models
    assert model.requests - model_before.requests == len(pairs)
    # Both frontends answered HTTP: each passed requests to the engine.
    passed = {f.index: f.requests for f in after.frontends}
    passed_before = {f.index: f.requests for f in before.frontends}
    assert sorted(passed) == [0, 1]
    assert all(passed[i] > passed_before.get(i, 0) for i in passed), (passed_before, passed)


def test_only_the_frontends_listen_on_the_http_port(server: HttpServerProcess) -> None:
    frontends = _frontend_pids(server)
    assert len(frontends) == 2
    assert sorted(_listeners(server.http_port, frontends)) == sorted(frontends)
    # The engine holds the port (bound, not listening: another server is refused, next
    # test) but serves no HTTP: its loop is the engine's.
    assert _listeners(server.http_port, [server.proc.pid]) == []


def test_a_held_http_port_is_refused_with_frontends(server: HttpServerProcess,
                                                    example_onnx: Path) -> None:
    """Only this server's frontends share its HTTP port, as its gRPC port."""
    second = subprocess.run(
        [sys.executable, "-m", "trtserve.service.cli", "serve", "--model",
         f"example={example_onnx}",
         "--frontends", "2", "--port", str(free_port()), "--metrics-port", "0",
         "--http-port", str(server.http_port)],
        capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stderr
    assert f"server.http_port: 127.0.0.1:{server.http_port} is in use" in second.stderr


def test_serving_means_every_frontend_listens_on_both_ports(example_onnx: Path) -> None:
    server = HttpServerProcess("--model", f"example={example_onnx}")
    try:
        server.wait_ready()  # gRPC health SERVING: from then on HTTP answers, everywhere
        codes = asyncio.run(_ready_codes(server.http_url, 16))
        assert codes == [200] * 16
        output = server.output()
        for index in (0, 1):
            listening = output.index(
                f"frontend-{index} trtserve.service.server: KServe v2 HTTP/REST")
            counted = re.search(rf"frontend-{index} \(pid \d+\) serving", output)
            assert counted and listening < counted.start(), output
        assert "(HTTP/REST on port" in output
    finally:
        code, output = server.terminate()
    assert code == 0, output


def test_a_killed_frontend_is_restarted_serving_http(example_onnx: Path) -> None:
    server = HttpServerProcess("--model", f"example={example_onnx}")
    try:
        server.wait_ready()
        old = _frontend_pids(server)
        os.kill(old[0], signal.SIGKILL)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            new = [p for p in _frontend_pids(server) if p not in old]
            if new and f"(pid {new[0]}) serving" in server.output():
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"frontend not restarted:\n{server.output()}")
        pids = [old[1], new[0]]
        assert sorted(_listeners(server.http_port, pids)) == sorted(pids)
        before = {f.pid: f.requests for f in Client(server.url).stats().frontends}

        async def load() -> list[list[tuple[np.ndarray, np.ndarray]]]:
            return await asyncio.gather(*(_client(server.http_url, i) for i in range(16)))

        for pairs in asyncio.run(load()):
            assert all(y.shape == (x.shape[0], 16) for x, y in pairs)
        after = {f.pid: f.requests for f in Client(server.url).stats().frontends}
        assert sorted(after) == sorted(pids)
        assert all(after[p] > before.get(p, 0) for p in pids), (before, after)
    finally:
        code, output = server.terminate()
    assert code == 0, output


def test_every_frontend_cuts_off_slow_headers(server: HttpServerProcess) -> None:
    """The HTTP limits reach the frontends: 16 connections (spread by the kernel; all on
    one frontend with odds of 2 in 65,536) sending headers a byte a second are each
    answered 408 and closed."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.reliability.test_http_limits import SLOW_REQUEST, _drip

    def slow_client(_: int) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
            return _drip(sock, SLOW_REQUEST)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(slow_client, range(16)))
    for sent, got in results:
        assert sent < len(SLOW_REQUEST) - 10, (sent, got)
        assert got.startswith(b"HTTP/1.1 408"), got
