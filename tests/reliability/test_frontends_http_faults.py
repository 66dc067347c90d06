"""Drain, deadlines, auth and TLS of KServe v2 HTTP/REST across processes (`--frontends 2`).

As tests/reliability/test_frontends_faults.py for gRPC: the engine process
serves the controlled double (y = 2x + 1, slow on purpose), two frontend
processes accept HTTP on one port. SIGTERM answers every accepted HTTP
request and exits 0; a request's timeout reaches the engine (it never runs);
each frontend checks the token and speaks TLS.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from tests.doubles.controlled import expected
from tests.integration.test_frontends_http import HttpServerProcess
from tests.reliability.certs import authority
from tests.reliability.controlled_server import MODEL, ControlledServerProcess
from tests.reliability.test_frontends_faults import _executed, _x
from trtserve.client import Client
from trtserve.service.testing.servers import free_port

CLIENTS = 16


class ControlledHttpServer(ControlledServerProcess):
    """The controlled double behind two frontends, with the HTTP port on."""

    def __init__(self, *args: str) -> None:
        self.http_port = free_port()
        super().__init__("--frontends", "2", "--http-port", str(self.http_port), *args)

    @property
    def infer_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL}/infer"


def _body(x: np.ndarray, **parameters: object) -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], "parameters": parameters}


def _y(answer: dict[str, object]) -> np.ndarray:
    (out,) = answer["outputs"]  # type: ignore[misc]
    return np.array(out["data"], np.float32).reshape(out["shape"])


@dataclass
class Outcome:
    sent: float
    ok: bool
    status: int = 0  # 0: no HTTP answer (the connection refused or closed)


async def _client(url: str, index: int, stop: asyncio.Event) -> list[Outcome]:
    """One request at a time on its own connection until refused three times."""
    outcomes: list[Outcome] = []
    refusals = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        n = 0
        while refusals < 3 and not stop.is_set():
            x = _x(index, n)
            sent = time.monotonic()
            try:
                async with session.post(url, json=_body(x)) as r:
                    if r.status == 200:
                        # Its own answer, no other request's.
                        np.testing.assert_array_equal(_y(await r.json()), expected(x))
                        outcomes.append(Outcome(sent, True, 200))
                    else:
                        outcomes.append(Outcome(sent, False, r.status))
                        refusals += 1
            except aiohttp.ClientConnectionError:
                outcomes.append(Outcome(sent, False))
                refusals += 1
            if outcomes[-1].ok is False:
                await asyncio.sleep(0.05)
            n += 1
    return outcomes


# How long after its `sent` stamp a request may still be on its way (as in
# test_frontends_faults.py, which had this slack; this HTTP twin did not).
SEND_SLACK_S = 0.05


def test_sigterm_answers_every_accepted_http_request_across_frontends() -> None:
    server = ControlledHttpServer("--sleep-ms", "50", "--max-batch-size", "4",
                                  "--grace-period-s", "20")
    try:
        server.wait_ready()
        sigterm = 0.0

        async def run() -> list[Outcome]:
            nonlocal sigterm
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(_client(server.infer_url, i, stop))
                     for i in range(CLIENTS)]
            await asyncio.sleep(1.0)  # every client has a request in flight or queued
            sigterm = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            done, _ = await asyncio.wait(tasks, timeout=60)
            stop.set()
            return [o for t in done for o in t.result()]

        outcomes = asyncio.run(run())
        server.proc.wait(60)
    finally:
        code, output = server.terminate()
    assert code == 0, output
    answered = sum(o.ok for o in outcomes)
    assert answered > 0
    for o in outcomes:
        if not o.ok:
            # Refused by the draining engine (503) or by a closed listener; never before
            # the SIGTERM, never another error. A request sent in the last moment before
            # the signal can reach the server after it (one CI run: sent 0.5 ms before,
            # refused 503), so those 50 ms are the server's to refuse.
            assert o.status in (0, 503), o
            assert o.sent > sigterm - SEND_SLACK_S, o
    # Every request the engine ran was answered: none lost between the processes.
    assert _executed(output) == answered, output


def test_an_http_timeout_reaches_the_engine() -> None:
    """A slow batch holds the only worker; a request queued behind it with a timeout
    (KServe's `timeout` parameter, µs) is answered 504 and never runs."""
    server = ControlledHttpServer("--sleep-ms", "800", "--max-batch-size", "1")
    try:
        server.wait_ready()

        async def run() -> None:
            async with aiohttp.ClientSession() as first_session, \
                    aiohttp.ClientSession() as late_session:
                first = asyncio.ensure_future(first_session.post(
                    server.infer_url, json=_body(_x(0, 0))))
                await asyncio.sleep(0.3)  # the first batch is running
                async with late_session.post(server.infer_url,
                                             json=_body(_x(1, 0), timeout=100_000)) as r:
                    assert r.status == 504, await r.text()
                    assert "deadline" in (await r.json())["error"].lower()
                async with await first as r:
                    assert r.status == 200
                    np.testing.assert_array_equal(_y(await r.json()), expected(_x(0, 0)))

        asyncio.run(run())
        time.sleep(1.0)  # anything still queued in the engine would have run by now
        (model,) = Client(server.url).stats(MODEL).models
        assert model.deadline_exceeded == 1, model
    finally:
        code, output = server.terminate()
    assert code == 0, output
    assert _executed(output) == 1, output


def test_every_frontend_checks_the_http_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token")
    server = ControlledHttpServer("--auth-token-file", str(token_file))
    x = _x(0, 0)

    async def run() -> None:
        for _ in range(8):  # new connections: both frontends are asked
            async with aiohttp.ClientSession() as session, \
                    session.post(server.infer_url, json=_body(x)) as r:
                assert r.status == 401, await r.text()
                assert r.headers["WWW-Authenticate"] == "Bearer"
            async with aiohttp.ClientSession(
                    headers={"Authorization": "Bearer s3cret-token"}) as session, \
                    session.post(server.infer_url, json=_body(x)) as r:
                assert r.status == 200, await r.text()
                np.testing.assert_array_equal(_y(await r.json()), expected(x))

    try:
        server.wait_ready()
        asyncio.run(run())
    finally:
        code, output = server.terminate()
    assert code == 0, output


def test_https_across_frontends(tmp_path: Path, example_onnx: Path) -> None:
    from tests.reliability.test_frontends_faults import _wait_serving_over_tls

    ca = authority("trtserve test CA")
    cert, key = ca.issue("trtserve test server", server=True).write(tmp_path, "server")
    server = HttpServerProcess("--model", f"example={example_onnx}",
                               "--tls-cert", str(cert), "--tls-key", str(key))
    trusted = ssl.create_default_context(cadata=ca.pem.decode())
    x = np.ones((1, 64), np.float32)
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    url = f"127.0.0.1:{server.http_port}/v2/models/example/infer"

    async def run() -> None:
        for _ in range(8):
            async with aiohttp.ClientSession() as session, \
                    session.post(f"https://{url}", json=body, ssl=trusted) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["outputs"][0]["shape"] == [1, 16]
            async with aiohttp.ClientSession() as session:
                with pytest.raises(aiohttp.ClientError):
                    async with session.post(f"http://{url}", json=body) as r:
                        await r.read()

    try:
        _wait_serving_over_tls(server, ca.pem)
        asyncio.run(run())
    finally:
        code, output = server.terminate()
    assert code == 0, output
