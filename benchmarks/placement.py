"""Where a served run's processes run on the host's cores: experiments for the
frontends rows (`benchmarks.frontends_rows once --frontend-nice N --engine-cpus N`).

The engine's loop thread paces every frontend, so a preempted loop stalls them all.
`--engine-cpus N` gives the engine the host's last N cores through the server's own
`server.engine_cpus` (the frontends then run on the rest) and keeps the client
processes off them too, as clients on other machines would be; `--frontend-nice N`
gives the engine precedence instead. Linux only: nice values and affinity are per
thread, so each is set on every thread a process has at that moment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trtserve.service import cpus as server_cpus


@dataclass(frozen=True)
class Placement:
    frontend_nice: int | None = None
    engine_cpus: int = 0  # 0: no pinning
    # The cores to share out, read before the server pins this process to its own.
    cpus: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))

    def _split(self) -> tuple[frozenset[int], frozenset[int]]:
        cpus = sorted(self.cpus)
        if not 0 < self.engine_cpus < len(cpus):
            raise ValueError(f"engine_cpus {self.engine_cpus}: this host has {len(cpus)} "
                             "usable cores; leave some to the frontends")
        return frozenset(cpus[-self.engine_cpus:]), frozenset(cpus[:-self.engine_cpus])

    def server_options(self) -> dict[str, Any]:
        """ServerConfig fields: the engine on the host's last `engine_cpus` cores."""
        if not self.engine_cpus:
            return {}
        return {"engine_cpus": server_cpus.format_list(self._split()[0])}

    def frontend(self, pid: int) -> None:
        if self.frontend_nice is not None:
            for tid in server_cpus.threads(pid):
                os.setpriority(os.PRIO_PROCESS, tid, self.frontend_nice)

    def client(self, pid: int) -> None:
        if self.engine_cpus:
            server_cpus.pin_process(self._split()[1], pid)

    def restore(self) -> None:
        """This process's threads back on every core (the server pinned them)."""
        if self.engine_cpus:
            server_cpus.pin_process(self.cpus)


# Where the kernel puts everything.
ANYWHERE = Placement()
