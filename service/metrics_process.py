"""The server's side of the metrics process (service/metrics_child.py).

The server binds the metrics socket, starts the child with it, and answers the
child's render requests on its own event loop: one read of the stats and one
formatting per request, and the child asks at most once per render interval
however many scrapers it serves. Nothing else about a scrape happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from service.metrics_http import ScrapeLimits

log = logging.getLogger("service.metrics")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
# The directory that holds the `service` package, so the child imports this same copy.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class MetricsStartError(RuntimeError):
    """The metrics process could not start (its message says why)."""


class MetricsProcess:
    """The child that serves scrapes, and the task that answers its render requests."""

    def __init__(self, listener: socket.socket, render: Callable[[], bytes],
                 limits: ScrapeLimits, *, token: str | None,
                 tls: dict[str, str] | None) -> None:
        self.port: int = listener.getsockname()[1]
        self.host: str = listener.getsockname()[0]
        self.renders = 0  # render requests answered: at most one per render interval
        self._render = render
        self._listener = listener
        self._link, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        setup = {"listen_fd": listener.fileno(), "link_fd": child_end.fileno(),
                 "limits": asdict(limits), "token": token, "tls": tls,
                 "server_pid": os.getpid(),
                 "log_level": logging.getLogger("service").getEffectiveLevel()}
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, (PACKAGE_ROOT,
                                                           os.environ.get("PYTHONPATH"))))}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.metrics_child"], stdin=subprocess.PIPE,
                pass_fds=(listener.fileno(), child_end.fileno()), env=env)
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps(setup).encode())
            self.proc.stdin.close()
        finally:
            child_end.close()
        self._await_start()
        self._link.setblocking(False)
        self._stopping = False
        self._writer: asyncio.StreamWriter | None = None
        self._task = asyncio.get_running_loop().create_task(self._answer())

    def _await_start(self) -> None:
        """Wait (blocking, at start-up only) for the child's first frame."""
        self._link.settimeout(START_TIMEOUT_S)
        try:
            head = _recv_exactly(self._link, 9)
            if head[:1] == b"E":
                message = _recv_exactly(self._link, int.from_bytes(head[1:], "big")).decode()
                raise MetricsStartError(f"metrics endpoint: {message}")
            if head[:1] != b"S":
                raise MetricsStartError(f"metrics endpoint: unexpected start frame {head!r}")
        except (TimeoutError, ConnectionError, EOFError, MetricsStartError) as e:
            self._kill()
            raise MetricsStartError(
                str(e) if isinstance(e, MetricsStartError) else
                f"metrics endpoint: its process did not start ({type(e).__name__}; exit "
                f"status {self.proc.returncode})") from None

    async def _answer(self) -> None:
        # From here the transport owns the link's socket and closes it (exactly once:
        # a second close, of a number reused meanwhile, would close a gRPC socket).
        reader, writer = await asyncio.open_unix_connection(sock=self._link)
        self._writer = writer
        while True:
            try:
                frame = await reader.readexactly(9)
            except (asyncio.IncompleteReadError, ConnectionError):
                if not self._stopping:
                    log.error("the metrics process exited (status %s): /metrics is down",
                              self.proc.poll())
                writer.close()
                return
            try:
                text = self._render()
            except Exception:  # the child answers 500; the server goes on
                log.exception("rendering metrics failed")
                text = b""
            self.renders += 1
            writer.write(frame[1:] + len(text).to_bytes(8, "big") + text)
            await writer.drain()

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._link.close()

    def shutdown(self) -> None:
        """End the child (closing the link tells it to) and stop answering it."""
        self._stopping = True
        with contextlib.suppress(OSError):  # already closed
            self._link.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the metrics process did not exit; killing it")
            self.proc.kill()
            self.proc.wait()
        self._task.cancel()
        if self._writer is not None:
            self._writer.close()
        else:  # the task never ran: the socket is still ours
            self._link.close()
        self._listener.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("the metrics process closed its link")
        data += chunk
    return data
