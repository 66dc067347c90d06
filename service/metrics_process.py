"""The server's side of the metrics process (service/metrics_child.py).

The server binds the metrics socket, starts the child with it, and answers the
child's render requests on its own event loop: one read of the stats, pickled
(the child formats the text), and the child asks at most once per render
interval however many scrapers it serves. Nothing else about a scrape happens here.
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
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

from trtserve.service.metrics_http import ScrapeLimits

log = logging.getLogger("trtserve.service.metrics")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
RESTART_DELAY_S = 1.0
# The directory that holds the `service` package, so the child imports this same copy.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class MetricsStartError(RuntimeError):
    """The metrics process could not start (its message says why)."""


class MetricsProcess:
    """The child that serves scrapes, the task that answers its render requests, and its
    restart when it dies on its own (after RESTART_DELAY_S, again and again)."""

    def __init__(self, listener: socket.socket, render: Callable[[], Awaitable[bytes]],
                 limits: ScrapeLimits, *, token: str | None,
                 tls: dict[str, str] | None) -> None:
        self.port: int = listener.getsockname()[1]
        self.host: str = listener.getsockname()[0]
        self.renders = 0  # render requests answered: at most one per render interval
        self.restarts = 0
        self._render = render
        self._listener = listener
        self._setup = {"listen_fd": listener.fileno(), "limits": asdict(limits),
                       "token": token, "tls": tls, "server_pid": os.getpid(),
                       "log_level": logging.getLogger("service").getEffectiveLevel()}
        self._stopping = False
        self.proc, self._link = self._spawn()
        self._await_start()
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    def _spawn(self) -> tuple[subprocess.Popen[bytes], socket.socket]:
        link, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        setup = {**self._setup, "link_fd": child_end.fileno()}
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, (PACKAGE_ROOT,
                                                           os.environ.get("PYTHONPATH"))))}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trtserve.service.metrics_child"], stdin=subprocess.PIPE,
                pass_fds=(self._listener.fileno(), child_end.fileno()), env=env)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(setup).encode())
            proc.stdin.close()
        except BaseException:
            link.close()
            raise
        finally:
            child_end.close()
        return proc, link

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
            self._link.close()
            raise MetricsStartError(
                str(e) if isinstance(e, MetricsStartError) else
                f"metrics endpoint: its process did not start ({type(e).__name__}; exit "
                f"status {self.proc.returncode})") from None
        self._link.setblocking(False)

    async def _supervise(self) -> None:
        started = True
        while True:
            await self._answer(started)
            if self._stopping:
                return
            self._kill()
            log.error("the metrics process exited (status %s); starting another in %g s",
                      self.proc.returncode, RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping:
                return
            self._link.close()
            self.proc, self._link = self._spawn()
            self._link.setblocking(False)
            started = False

    async def _answer(self, started: bool) -> None:
        """Answer the child's render requests until its link closes."""
        # The transport gets a duplicate and closes that; `_link` stays ours to shut
        # down and close (one owner per descriptor: a second close of a number reused
        # meanwhile would close someone else's socket, such as a gRPC connection).
        reader, writer = await asyncio.open_unix_connection(sock=self._link.dup())
        try:
            if not started:
                head = await asyncio.wait_for(reader.readexactly(9), START_TIMEOUT_S)
                if head[:1] != b"S":
                    log.error("the metrics process did not start: %s",
                              (await reader.read(64 * 1024)).decode(errors="replace"))
                    return
                self.restarts += 1
                log.warning("the metrics process serves again")
            while True:
                frame = await reader.readexactly(9)
                try:
                    text = await self._render()
                except Exception:  # the child serves what it has; the server goes on
                    log.exception("rendering metrics failed")
                    text = b""
                self.renders += 1
                writer.write(frame[1:] + len(text).to_bytes(8, "big") + text)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return
        finally:
            writer.close()

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def shutdown(self) -> None:
        """End the child (closing the link tells it to) and stop answering it."""
        self._stopping = True
        with contextlib.suppress(OSError):  # already closed
            self._link.shutdown(socket.SHUT_RDWR)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("the metrics process did not exit; killing it")
            self._kill()
        self._task.cancel()
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
