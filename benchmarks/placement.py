"""Where a served run's processes run on the host's cores: experiments for the
frontends rows (`benchmarks.frontends_rows once --frontend-nice N --engine-cpus N`).

The engine's loop thread paces every frontend, so a preempted loop stalls them all;
on a host whose cores the load generator shares, these ask whether giving the engine
precedence (frontends at a higher nice value) or cores of its own (the engine's
threads on the host's last cores, the frontends and the client processes on the
rest) lets more frontends serve more. Linux only: nice values and affinity are per
thread, so each is set on every thread a process has at that moment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def threads(pid: int) -> list[int]:
    """The thread ids of process `pid` now."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


@dataclass(frozen=True)
class Placement:
    frontend_nice: int | None = None
    engine_cpus: int = 0  # 0: no pinning
    # The cores to share out, read once: the engine's thread is pinned before the
    # frontends and the clients are placed.
    cpus: frozenset[int] = field(default_factory=lambda: frozenset(os.sched_getaffinity(0)))

    def _split(self) -> tuple[set[int], set[int]]:
        cpus = sorted(self.cpus)
        if not 0 < self.engine_cpus < len(cpus):
            raise ValueError(f"engine_cpus {self.engine_cpus}: this host has {len(cpus)} "
                             "usable cores; leave some to the frontends")
        return set(cpus[-self.engine_cpus:]), set(cpus[:-self.engine_cpus])

    def before_engine(self) -> set[int] | None:
        """Pin the calling thread (the engine's threads start from it and inherit its
        cores) to the engine's cores; returns the cores to restore it to."""
        if not self.engine_cpus:
            return None
        old = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self._split()[0])
        return old

    def frontend(self, pid: int) -> None:
        for tid in threads(pid):
            if self.frontend_nice is not None:
                os.setpriority(os.PRIO_PROCESS, tid, self.frontend_nice)
            if self.engine_cpus:
                os.sched_setaffinity(tid, self._split()[1])

    def client(self, pid: int) -> None:
        if self.engine_cpus:
            for tid in threads(pid):
                os.sched_setaffinity(tid, self._split()[1])


# Where the kernel puts everything.
ANYWHERE = Placement()
