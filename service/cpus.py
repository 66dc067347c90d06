"""The cores the engine runs on (`server.engine_cpus`), and the frontends on the rest.

The engine's event loop paces every frontend, and its worker threads hand the GIL
to it and back for every batch: on the GPU host, with the engine's threads on a
core of their own, 8 frontends served 26-40% more 8-row requests than where the
kernel put them (docs/processes.md, "Session 18"). Linux keeps affinity per
thread and a new thread inherits its creator's, so `pin_process` sets it on
every thread the process has; the engine pins itself before it starts its
threads and the frontends, and each frontend pins itself to the rest first
thing (`--cpus`).
"""

from __future__ import annotations

import os
from collections.abc import Set as AbstractSet
from contextlib import suppress
from dataclasses import dataclass

from trtserve.service.errors import ConfigError

EXAMPLES = "a CPU list such as '15', '14-15' or '0,8-9'"
# Past any kernel's CPU count (Linux's NR_CPUS is at most 8192): a typo such as
# "0-4000000000" is refused rather than spelled out.
MAX_CPU = 65535


def parse(text: str) -> frozenset[int]:
    """The CPUs of a Linux CPU list ("0-3,8", as `taskset -c` and cpusets write it);
    ValueError if it is not one."""
    cpus: set[int] = set()
    for part in text.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"not a CPU list: {text!r}")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ValueError(f"not a CPU list: {text!r} ({part.strip()} runs backwards)")
        if last > MAX_CPU:
            raise ValueError(f"not a CPU list: {text!r} (CPU {last} is past {MAX_CPU})")
        cpus.update(range(first, last + 1))
    return frozenset(cpus)


def is_list(text: str) -> bool:
    """Whether `text` is a CPU list `parse` takes."""
    try:
        parse(text)
    except ValueError:
        return False
    return True


def format_list(cpus: AbstractSet[int]) -> str:
    """The shortest CPU list for `cpus` ({0, 1, 2, 5} -> "0-2,5")."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


@dataclass(frozen=True)
class CpuPlan:
    engine: frozenset[int]
    frontends: frozenset[int]  # the rest of the cores this process may use


def plan(engine_cpus: str, frontends: int) -> CpuPlan | None:
    """Where the engine and the frontends run on this host (None: where the kernel puts
    them); ConfigError for cores this process may not use, or none left to frontends."""
    if not engine_cpus:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigError("server.engine_cpus: this platform cannot pin threads to cores; "
                          "leave it empty")
    engine = parse(engine_cpus)
    usable = frozenset(os.sched_getaffinity(0))
    if not engine <= usable:
        raise ConfigError(f"server.engine_cpus: got {engine_cpus!r}, but this process may "
                          f"only use CPUs {format_list(usable)}")
    rest = usable - engine
    if frontends > 1 and not rest:
        raise ConfigError(f"server.engine_cpus: {engine_cpus!r} leaves no core to the "
                          f"{frontends} frontends (usable: {format_list(usable)})")
    return CpuPlan(engine, rest)


def threads(pid: int | str = "self") -> list[int]:
    """The thread ids of process `pid` (default: this one) now."""
    return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]


def pin_process(cpus: AbstractSet[int], pid: int | str = "self") -> None:
    """Every thread of process `pid` (default: this one), and those they start from
    now on, on `cpus`."""
    for tid in threads(pid):
        with suppress(ProcessLookupError):  # the thread ended meanwhile
            os.sched_setaffinity(tid, cpus)
