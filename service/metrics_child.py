"""The metrics process: `python -m trtserve.service.metrics_child`, started by
service/metrics_process.py.

It serves HTTP on the listening socket the server bound (so bind errors are
the server's, in its own words) and asks the server, over a socketpair, for
the model metrics at most once per render interval (pickled families, which
it formats as text here). Everything a scraper can
cost (connections, parsing, TLS, gzip, the process's own /proc readings)
is paid here, in another process and at a lower CPU priority (nice 10), so
no scrape load takes the serving process's GIL or event loop.

Its setup arrives as JSON on stdin (the token must not be in argv, which `ps`
shows). It exits when the server closes the link (or dies).

The link, both ways binary: the child sends b"S" + 8 zero bytes once it
serves, or b"E" + 8-byte length + a UTF-8 message if it cannot; then
b"R" + an 8-byte sequence number per render it needs, and the server
answers each with the sequence number, an 8-byte length and the pickled
metric families (trtserve.service.metrics.snapshot).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import socket
import ssl
import sys
from collections.abc import Iterator
from typing import Any

from prometheus_client import Metric, ProcessCollector, generate_latest

from trtserve.service.config import TlsConfig
from trtserve.service.metrics_http import ScrapeLimits, ScrapeServer
from trtserve.service.tls import server_ssl_context

log = logging.getLogger("trtserve.service.metrics")

NICE = 10


def _ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    try:
        return server_ssl_context(tls)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ValueError(f"server.metrics_tls: cannot load {e}") from None


class ServerLink:
    """The child's end of the link: render requests out, texts back, matched by number."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._seq = 0
        self._waiting: dict[int, asyncio.Future[bytes]] = {}

    def send(self, frame: bytes) -> None:
        self._writer.write(frame)

    async def render(self) -> bytes:
        self._seq += 1
        seq = self._seq
        future = asyncio.get_running_loop().create_future()
        self._waiting[seq] = future
        self._writer.write(b"R" + seq.to_bytes(8, "big"))
        try:
            return await future
        finally:
            # A request that timed out: its late answer is dropped by run().
            self._waiting.pop(seq, None)

    async def run(self) -> None:
        """Read answers until the server closes the link."""
        while True:
            try:
                head = await self._reader.readexactly(16)
                text = await self._reader.readexactly(int.from_bytes(head[8:], "big"))
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            future = self._waiting.get(int.from_bytes(head[:8], "big"))
            if future is not None and not future.done():
                future.set_result(text)


class _Scrape:
    """The server's model families, then its process metrics (not this child's)."""

    def __init__(self, families: list[Metric], process: ProcessCollector) -> None:
        self._families = families
        self._process = process

    def collect(self) -> Iterator[Metric]:
        yield from self._families
        yield from self._process.collect()


async def serve(setup: dict[str, Any]) -> None:
    link = socket.socket(fileno=setup["link_fd"])
    listener = socket.socket(fileno=setup["listen_fd"])
    reader, writer = await asyncio.open_unix_connection(sock=link)
    server = ServerLink(reader, writer)
    try:
        tls = setup["tls"]
        # The gRPC server's certificate and key (and client CA: mutual TLS), checked at
        # start by the server (service/tls.py), loaded here the same way.
        context = _ssl_context(TlsConfig(**tls)) if tls else None
        server_pid = setup["server_pid"]
        process = ProcessCollector(namespace="trtserve", pid=lambda: server_pid, registry=None)

        async def render() -> bytes:
            snapshot = await server.render()
            # The server's own pickle (trtserve.service.metrics.snapshot), over a socketpair only
            # it holds; empty when its read failed (it logged why).
            families = pickle.loads(snapshot) if snapshot else []
            return generate_latest(_Scrape(families, process))

        scrapes = ScrapeServer(listener, render, ScrapeLimits(**setup["limits"]),
                               token=setup["token"], ssl_context=context)
        listening = await scrapes.start()
    except Exception as e:  # any start-up failure is reported to the server, which raises
        message = str(e).encode()
        server.send(b"E" + len(message).to_bytes(8, "big") + message)
        await writer.drain()
        return
    server.send(b"S" + bytes(8))
    await server.run()
    await scrapes.close(listening)


def main() -> None:
    setup = json.loads(sys.stdin.read())
    # Ctrl-C reaches the whole process group: the server decides when this ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(NICE)  # on a contended CPU the server's threads go first
    logging.basicConfig(level=setup["log_level"],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(setup))


if __name__ == "__main__":
    main()
