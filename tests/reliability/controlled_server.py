"""A real trtserve server process serving the controlled double, for signal tests.

    python -m tests.reliability.controlled_server --port 8001 --sleep-ms 100

The process runs `Server.serve_until_signal()` exactly as `trtserve serve`
does; only the model differs (y = 2x + 1, slow on purpose, so a drain takes
a known while).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from tests.doubles.controlled import ControlledBackend, Controls, controlled_model
from trtserve.service.config import ServerConfig
from trtserve.service.processes import EngineServer, log_format
from trtserve.service.server import Server
from trtserve.service.testing.servers import ServerProcess, free_port

MODEL = "controlled"
EXECUTED, BATCHES = "executed_rows", "batches"
log = logging.getLogger(__name__)


class _ServesTheDouble:
    """Mixed into a server class: serves the double once the server has started, and
    logs what it executed when it stops (the test compares that with its answers)."""

    def serve_double(self, double: ControlledBackend, workers: int,
                     max_queue_delay_us: int) -> None:
        self._double = double
        self._model = controlled_model(MODEL, workers=workers,
                                       max_batch_size=double.max_batch_size,
                                       max_queue_delay_us=max_queue_delay_us)

    async def start(self) -> int:
        port: int = await super().start()  # type: ignore[misc]
        await self.add_model(self._double.runtime(self._model))  # type: ignore[attr-defined]
        return port

    async def stop(self) -> None:
        await super().stop()  # type: ignore[misc]
        executed, sizes = self._double.controls.snapshot()
        log.info("%s %d %s %d", EXECUTED, executed, BATCHES, len(sizes))


class ControlledServer(_ServesTheDouble, Server):
    """One process serving the double."""


class ControlledEngineServer(_ServesTheDouble, EngineServer):
    """The same, as the engine process of a server of N frontend processes."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sleep-ms", type=float, default=0.0, help="per batch")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=4)
    p.add_argument("--max-queue-delay-us", type=int, default=1000)
    p.add_argument("--grace-period-s", type=float, default=10.0)
    p.add_argument("--frontends", type=int, default=1)
    p.add_argument("--auth-token-file", default="")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=log_format(
        "engine" if args.frontends > 1 else ""))
    config = ServerConfig(host="127.0.0.1", port=args.port, metrics_port=0, http_port=0,
                          grace_period_s=args.grace_period_s,
                          auth_token_file=args.auth_token_file)
    double = ControlledBackend(Controls(sleep_s=args.sleep_ms / 1000),
                               max_batch_size=args.max_batch_size)
    server: ControlledServer | ControlledEngineServer = (
        ControlledEngineServer(config, args.frontends) if args.frontends > 1
        else ControlledServer(config))
    server.serve_double(double, args.workers, args.max_queue_delay_us)
    asyncio.run(server.serve_until_signal())
    return 0


class ControlledServerProcess(ServerProcess):
    """`python -m tests.reliability.controlled_server` as a child process."""

    def __init__(self, *args: str) -> None:  # deliberately not ServerProcess's command line
        self.port = free_port()
        self._start(["tests.reliability.controlled_server", "--port", str(self.port), *args])

    def wait_ready(self, timeout: float = 60, service: str = MODEL) -> None:
        """Until the model itself (not only the server) is SERVING."""
        super().wait_ready(timeout, service)


if __name__ == "__main__":
    sys.exit(main())
