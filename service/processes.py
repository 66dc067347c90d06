"""One engine process, N frontend processes on one port (`server.frontends` > 1).

```
clients ──gRPC──▶ frontend-0 .. frontend-N-1   (child processes, one port, SO_REUSEPORT)
                    decode, validate, encode, auth, TLS, health, reflection
                    │ link: descriptors over a socketpair; large tensors in shared memory
                    ▼
                  main process = the engine: repository, batchers, workers, GPU, metrics
```

The main process checks everything a single-process server checks, reserves
the port (a bound, not listening, SO_REUSEPORT socket: another server's check
then finds it held, and only processes of this user could join it), starts the
frontends and loads the models. It keeps the frontends running: one that exits
while the server serves is restarted (its requests in flight are lost with it,
nobody else's). SIGTERM or SIGINT drains: each frontend stops accepting and
answers what it accepted, then exits; then the engine stops its models.
A frontend that loses the engine (the main process died) turns NOT_SERVING
and exits on its own.

Each process's log lines name it ("engine", "frontend-2"); the frontends
inherit the main process's stdout and stderr.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from trtserve.service import cpus, ports
from trtserve.service.config import ModelConfig, ServerConfig
from trtserve.service.engine.host import EngineHost, FrontendPort
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.errors import PortInUse, StartError
from trtserve.service.ipc.shm import Arena
from trtserve.service.metrics import start_metrics
from trtserve.service.server import Server

log = logging.getLogger(__name__)

# A frontend that has not bound its port and said so within this is broken.
START_TIMEOUT_S = 60.0
# A frontend that exits sooner than this after its start counts as failing to start;
# after this many such exits in a row the server gives up (exit 1) instead of looping.
QUICK_EXIT_S = 10.0
MAX_QUICK_EXITS = 5
# On drain, the frontends get the grace period plus this to answer and exit.
EXIT_MARGIN_S = 5.0


def log_format(process: str) -> str:
    """The log line format of one process of the server; the name says which ("": the
    only process)."""
    return f"%(asctime)s %(levelname)s {process + ' ' if process else ''}%(name)s: %(message)s"


@dataclass
class FrontendProcess:
    index: int
    proc: asyncio.subprocess.Process
    port: FrontendPort
    started_s: float


class EngineServer(Server):
    """The main process of a server of N frontends: the engine, and keeper of the frontends."""

    def __init__(self, config: ServerConfig, frontends: int, log_level: str = "INFO") -> None:
        super().__init__(config)
        self.count = frontends
        self.log_level = log_level
        self.frontends: dict[int, FrontendProcess] = {}
        self.host: EngineHost | None = None
        self._reserved: list[socket.socket] = []
        self._watchers: set[asyncio.Task[None]] = set()
        self._quick_exits = 0
        self._draining = False
        # Why the server must stop on its own (a frontend that cannot start); exit 1.
        self.failure: str | None = None

    async def start(self) -> int:
        _, to_load = self._preflight()
        self._place(self.count)
        try:
            self.port = self._reserve_port(self.config.port, "server.port")
            if self.config.http_port:
                # The frontends serve HTTP too, each on this port; this process none.
                self.http_port = self._reserve_port(self.config.http_port,
                                                    "server.http_port")
        except BaseException:
            self._release_ports()
            raise
        config = dataclasses.replace(self.config, port=self.port, http_port=self.http_port,
                                     frontends=1)
        self.host = EngineHost(self.engine, config,
                               failed_models=lambda: tuple(self.models.failed),
                               pinner_for=self.engine.arena_pinner)
        try:
            self._start_metrics()
            await asyncio.wait_for(
                asyncio.gather(*(self._spawn(i) for i in range(self.count))), START_TIMEOUT_S)
            await self._load_all(to_load)
        except BaseException:
            await self.stop()
            raise
        self._ready = True
        self.host.set_health("", True)
        self._start_watch()
        log.info("serving %d model(s) on %s:%d%s with %d frontend processes",
                 len(self.models), self.config.host, self.port,
                 f" (HTTP/REST on port {self.http_port})" if self.http_port else "", self.count)
        return self.port

    async def _load(self, config: ModelConfig, version: str = "1") -> None:
        await super()._load(config, version)
        assert self.host is not None
        self.host.set_health(config.name, self.engine.ready(config.name))

    async def add_model(self, runtime: ModelRuntime) -> None:
        await super().add_model(runtime)
        assert self.host is not None
        self.host.set_health(runtime.name, self.engine.ready(runtime.name))

    def _start_metrics(self) -> None:
        """Metrics come from this process, which sees every model and every frontend."""
        if not self.config.metrics_port:
            return
        assert self.host is not None
        try:
            self._metrics = start_metrics(self.config, self.host)
        except OSError as e:
            raise PortInUse(f"server.metrics_port: cannot serve metrics on "
                            f"{self.config.metrics_host}:{self.config.metrics_port}: "
                            f"{e.strerror or e}") from None

    def _reserve_port(self, port: int, key: str) -> int:
        """Hold host:port for this server's frontends (ports.reserve); its port number."""
        held = ports.reserve(self.config.host, port, key)
        self._reserved.extend(held)
        return int(held[0].getsockname()[1])

    # --- the frontends ---

    async def _spawn(self, index: int) -> None:
        assert self.host is not None
        arena_bytes = self.config.frontend_arena_mib << 20
        inputs = Arena.create(f"frontend-{index}-in", arena_bytes)
        outputs = Arena.create(f"frontend-{index}-out", arena_bytes)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "trtserve.service.frontend_process",
                "--index", str(index), "--link-fd", str(theirs.fileno()),
                "--inputs-fd", str(inputs.fd), "--outputs-fd", str(outputs.fd),
                "--arena-bytes", str(arena_bytes), "--log-level", self.log_level,
                "--event-loop", self.config.event_loop,
                *(() if self.cpus is None else ("--cpus", cpus.format_list(self.cpus.frontends))),
                pass_fds=(theirs.fileno(), inputs.fd, outputs.fd),
                stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.setblocking(False)
        port = await self.host.attach(index, proc.pid, ours, inputs, outputs)
        frontend = FrontendProcess(index, proc, port, time.monotonic())
        self.frontends[index] = frontend
        watcher = asyncio.ensure_future(self._watch(frontend))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        ready = asyncio.ensure_future(asyncio.shield(port.ready))
        exited = asyncio.ensure_future(proc.wait())
        await asyncio.wait((ready, exited), return_when=asyncio.FIRST_COMPLETED)
        if not ready.done() or ready.exception() is not None:
            ready.cancel()
            raise StartError(f"frontend-{index} exited while starting (code "
                             f"{proc.returncode}); the lines above say why")
        log.info("frontend-%d (pid %d) serving", index, proc.pid)

    async def _watch(self, frontend: FrontendProcess) -> None:
        """Restart a frontend that exits while the server serves."""
        code = await frontend.proc.wait()
        await frontend.port.closed
        frontend.port.close()
        if self._draining or not self._ready:
            return
        lived_s = time.monotonic() - frontend.started_s
        self._quick_exits = self._quick_exits + 1 if lived_s < QUICK_EXIT_S else 0
        log.warning("frontend-%d (pid %d) exited with code %s after %.1fs; its requests in "
                    "flight were lost; restarting it", frontend.index, frontend.proc.pid, code,
                    lived_s)
        if self._quick_exits > MAX_QUICK_EXITS:
            self.failure = (f"frontend processes keep exiting ({self._quick_exits} within "
                            f"{QUICK_EXIT_S:.0f}s of their start); stopping")
            log.error("%s", self.failure)
            self.request_stop()
            return
        await asyncio.sleep(0.2 * self._quick_exits)
        if self._draining:
            return
        try:
            await asyncio.wait_for(self._spawn(frontend.index), START_TIMEOUT_S)
        except (StartError, TimeoutError, OSError) as e:
            log.error("frontend-%d could not be restarted: %s", frontend.index, e)
            self.failure = f"frontend-{frontend.index} could not be restarted"
            self.request_stop()

    # --- stop ---

    def request_stop(self) -> None:
        # At once, from the signal handler: a frontend that exits on the same SIGINT
        # (a terminal's Ctrl-C reaches the whole process group) is not restarted.
        self._draining = True
        super().request_stop()

    async def stop(self) -> None:
        """Drain: the frontends answer what they accepted and exit, then the models stop."""
        self._draining = True
        self._ready = False
        # At once, as one process does: the frontends relay model control until they exit,
        # and a load let through then built and switched to a model during shutdown.
        self.models.refuse_loads()
        grace = self.config.grace_period_s
        if self.host is not None:
            self.host.set_health("", False)
            self.host.drain()
        procs = [f.proc for f in self.frontends.values() if f.proc.returncode is None]
        if procs:
            _done, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=grace + EXIT_MARGIN_S)
            for p in procs:
                if p.returncode is None:
                    log.error("frontend (pid %d) did not exit within the grace period; "
                              "killing it", p.pid)
                    p.kill()
            if pending:
                await asyncio.wait(pending, timeout=5)
        for frontend in self.frontends.values():
            if frontend.proc.returncode not in (0, None):
                log.warning("frontend-%d exited with code %s", frontend.index,
                            frontend.proc.returncode)
        try:
            await asyncio.wait_for(self.models.drain(), timeout=max(grace, 1.0))
        except TimeoutError:
            log.warning("grace period of %.1fs ended with work in flight", grace)
        try:
            await asyncio.wait_for(self.models.stop(), timeout=max(grace, 1.0))
        except TimeoutError:
            log.error("workers did not stop within the grace period; exiting without them")
        for frontend in self.frontends.values():
            frontend.port.close()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics = None
        self._release_ports()

    def _release_ports(self) -> None:
        for s in self._reserved:
            s.close()
        self._reserved.clear()


def serve(config: ServerConfig, log_level: str) -> int:
    """Run the engine and its frontends until SIGTERM or SIGINT; the process's exit code."""
    from trtserve.service.server import loop_factory

    server = EngineServer(config, config.resolved_frontends, log_level)
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        runner.run(server.serve_until_signal())
    return 1 if server.failure else 0
