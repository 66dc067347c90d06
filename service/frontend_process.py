"""A frontend process of a server of N frontends (service/processes.py starts it).

It serves gRPC (trtserve.v1, KServe v2, health, reflection) on the server's port
and KServe v2 HTTP/REST on its `http_port`, both with SO_REUSEPORT beside the
other frontends (the engine process serves neither), and reaches the engine in the
main process through `RemoteEngine`. It exits 0 after a drain (the engine's
DRAIN, or SIGTERM/SIGINT: every accepted request answered) and 1 when the
engine goes away (health NOT_SERVING first, so load balancers look elsewhere).
"""

from __future__ import annotations

# First, before any module imports grpc: it sets what gRPC's C core reads as grpc loads.
from trtserve.client import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import asyncio
import logging
import signal
import socket
import sys

from trtserve.service import auth, cpus, tls
from trtserve.service.config import ServerConfig
from trtserve.service.engine.remote import RemoteEngine
from trtserve.service.ipc.shm import Arena
from trtserve.service.memory import tune_collector, tune_malloc
from trtserve.service.processes import log_format
from trtserve.service.server import NOT_SERVING, SERVING, Server, loop_factory

log = logging.getLogger("trtserve.frontend")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="trtserve-frontend", allow_abbrev=False)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--link-fd", type=int, required=True)
    p.add_argument("--inputs-fd", type=int, required=True)
    p.add_argument("--outputs-fd", type=int, required=True)
    p.add_argument("--arena-bytes", type=int, required=True)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--event-loop", default="auto")
    p.add_argument("--cpus", help="the CPUs to run on (server.engine_cpus: the engine's "
                   "are not among them); default: those inherited")
    args = p.parse_args(argv)
    if args.cpus:  # before the event loop and gRPC start threads, which inherit them
        cpus.pin_process(cpus.parse(args.cpus))
    logging.basicConfig(level=args.log_level, format=log_format(f"frontend-{args.index}"))
    try:
        with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
            return runner.run(_serve(args))
    except Exception:
        log.exception("frontend-%d failed", args.index)
        return 1


class FrontendServer(Server):
    """The gRPC side of `Server` over a `RemoteEngine`: no models here, health from the engine.

    Its port is shared with the other frontends (SO_REUSEPORT); the engine process
    checked and holds it, checked the models and serves metrics. What it checks
    itself is what it uses: the token and the TLS files.
    """

    def __init__(self, config: ServerConfig, engine: RemoteEngine) -> None:
        super().__init__(config)
        self.remote = engine
        self.engine = engine  # type: ignore[assignment]
        engine.add_health_listener(self._on_engine_health)
        # The engine's byte budget asks the engine process's trimmer; this process decodes
        # requests and encodes answers, and gives their memory back with its own.
        engine.after_large(config.trim_after_request_bytes, self.trimmer.request)

    # gRPC and HTTP ports shared with the other frontends (SO_REUSEPORT).
    _shares_ports = True
    # This process learns that a large request is over when the engine answers it
    # (RemoteEngine.after_large), before the answer is encoded and sent: the trim a
    # second later gives back what the answers held, once their clients read them.
    _trim_follow_up_s = 1.0

    def _grpc_options(self) -> list[tuple[str, int]]:
        return [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in super()._grpc_options()]

    async def start(self) -> int:
        """Serve gRPC and HTTP (when `http_port` is set) on the ports the engine holds.
        The engine counts this frontend ready only once both listen."""
        token = auth.load_token(self.config.auth_token_file)
        tls.check(self.config.tls)
        await self._start_grpc(token)
        await self._start_http(token)
        # What the engine said before the port was bound.
        for model in self.remote.models():
            if self.remote.ready(model):
                await self.health.set(model, SERVING)
        if self.remote.ready():
            await self._set_serving(True)
        return self.port

    def _on_engine_health(self, model: str, serving: bool) -> None:
        if self._server is None or not (self._ready or serving or model):
            return
        task = asyncio.get_running_loop().create_task(
            self._set_serving(serving) if not model else
            self.health.set(model, SERVING if serving else NOT_SERVING))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self) -> None:
        await self.remote.drain()


async def _serve(args: argparse.Namespace) -> int:
    engine = RemoteEngine(Arena(args.inputs_fd, args.arena_bytes),
                          Arena(args.outputs_fd, args.arena_bytes))
    sock = socket.socket(fileno=args.link_fd)
    sock.setblocking(False)
    try:
        config = await engine.connect(sock)
    except ConnectionError:
        log.error("the engine process went away before this frontend started")
        return 1
    tune_malloc(config.malloc_mmap_threshold_bytes)
    tune_collector(config.gc_gen0_threshold)
    engine.spin_s = config.resolved_frontend_spin_us / 1e6
    engine.hold_s = config.frontend_hold_us / 1e6
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = FrontendServer(config, engine)
    await server.start()
    engine.ready_to_serve()
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, engine.drain_requested, engine.lost)]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    lost = engine.lost.is_set() and not stop.is_set() and not engine.drain_requested.is_set()
    if lost:
        log.error("the engine process went away; stopping (NOT_SERVING)")
    await server.stop()
    engine.close()
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
