"""A frontend process of a server of N frontends (service/processes.py starts it).

It serves gRPC (trtserve.v1, KServe v2, health, reflection) on the server's port
with SO_REUSEPORT, beside the other frontends, and reaches the engine in the
main process through `RemoteEngine`. It exits 0 after a drain (the engine's
DRAIN, or SIGTERM/SIGINT: every accepted request answered) and 1 when the
engine goes away (health NOT_SERVING first, so load balancers look elsewhere).
"""

from __future__ import annotations

# First, before any module imports grpc: it sets what gRPC's C core reads as grpc loads.
from service import grpc_tuning  # noqa: F401  # isort: skip

import argparse
import asyncio
import logging
import signal
import socket
import sys

from service.engine.remote import RemoteEngine
from service.ipc.shm import Arena
from service.processes import log_format

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
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format=log_format(f"frontend-{args.index}"))
    from service.server import loop_factory

    try:
        with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
            return runner.run(_serve(args))
    except Exception:
        log.exception("frontend-%d failed", args.index)
        return 1


async def _serve(args: argparse.Namespace) -> int:
    from service.server import FrontendServer

    engine = RemoteEngine(Arena(args.inputs_fd, args.arena_bytes),
                          Arena(args.outputs_fd, args.arena_bytes))
    sock = socket.socket(fileno=args.link_fd)
    sock.setblocking(False)
    try:
        config = await engine.connect(sock)
    except ConnectionError:
        log.error("the engine process went away before this frontend started")
        return 1
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
