"""The host's cores as the server sees them: how many it may use, and which ones the
engine and the frontends run on.

How many (`usable`): the CPU affinity, capped by the cgroup's CPU quota, since a
container's CPU limit throttles the whole server however many cores it may run on;
`frontends = auto` and ONNX Runtime's default threads follow it.

Which (`server.engine_cpus`): the engine's event loop paces every frontend, and its
worker threads hand the GIL to it and back for every batch: on the GPU host, with
the engine's threads on a core of their own, 8 frontends served 23-67% more 8-row
requests than where the kernel put them (docs/processes-measured.md, "Session 19"). Linux
keeps affinity per thread and a new thread inherits its creator's, so `pin_process`
sets it on every thread the process has; the engine pins itself before it starts
its threads and the frontends, and each frontend pins itself to the rest first
thing (`--cpus`).
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

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


# --- how many cores this process may use --------------------------------------------------


def usable() -> int:
    """Cores this process may use: its CPU affinity (taskset, a cpuset), capped by its
    cgroup's CPU quota rounded up (a container's `--cpus`, a Kubernetes CPU limit).

    A quota leaves every core in the affinity but throttles the whole process group
    once it has used its share of each period: `frontends = auto` and ONNX Runtime's
    threads sized by the affinity alone would oversubscribe it many times over."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    limit = cpu_quota()
    return cores if limit is None else max(1, min(cores, math.ceil(limit)))


def cpu_quota(proc_cgroup: str = "/proc/self/cgroup",
              mountinfo: str = "/proc/self/mountinfo") -> float | None:
    """The CPU limit of this process's cgroup, in cores: the lowest quota / period on
    the way up its cgroup v2 or v1 `cpu` hierarchy (a parent's limit binds its children
    too). None where there is none, or where the files cannot be read (not Linux)."""
    try:
        memberships = Path(proc_cgroup).read_text().splitlines()
        mounts = Path(mountinfo).read_text().splitlines()
    except OSError:
        return None
    limits = [limit for directory, top, version in _cpu_cgroups(memberships, mounts)
              for limit in _limits_up(directory, top, version)]
    return min(limits) if limits else None


def _cpu_cgroups(memberships: list[str], mounts: list[str]
                 ) -> Iterator[tuple[Path, Path, int]]:
    """(this process's cgroup directory, its mount point, cgroup version) for every
    hierarchy that can hold a CPU limit: the v2 one, and v1's with the `cpu` controller."""
    for line in memberships:  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if "/.." in path:  # above this cgroup namespace's root: not in our mounts
            continue
        version = 2 if controllers == "" else 1
        if version == 1 and "cpu" not in controllers.split(","):
            continue
        for mount in mounts:
            # "ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [TAGS...] - FSTYPE SOURCE SUPER_OPTIONS"
            fields = mount.split()
            if "-" not in fields:
                continue
            tail = fields[fields.index("-") + 1:]
            if len(tail) < 3 or len(fields) < 5:
                continue
            fstype, options = tail[0], tail[2].split(",")
            if (version == 2 and fstype != "cgroup2") or (
                    version == 1 and (fstype != "cgroup" or "cpu" not in options)):
                continue
            root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
            # Outside the mount's root (another cgroup namespace's view): not ours to read.
            if root == "/":
                yield point / path.lstrip("/"), point, version
            elif path == root or path.startswith(root + "/"):
                yield point / path[len(root):].lstrip("/"), point, version


def _limits_up(directory: Path, top: Path, version: int) -> Iterator[float]:
    """Each CPU limit from `directory` up to the hierarchy's mount point `top`."""
    while True:
        limit = _limit(directory, version)
        if limit is not None:
            yield limit
        if directory == top or top not in directory.parents:
            return
        directory = directory.parent


def _limit(directory: Path, version: int) -> float | None:
    """One cgroup's CPU limit in cores, None for none (v2 `cpu.max`: "max 100000" or
    "150000 100000"; v1: `cpu.cfs_quota_us` -1 or a quota over `cpu.cfs_period_us`)."""
    try:
        if version == 2:
            quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text().strip()
            period = (directory / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) < 0 or int(period) <= 0:
            return None
        return int(quota) / int(period)
    except (OSError, ValueError):
        return None


def _unescape(text: str) -> str:
    """A mountinfo path field: spaces and the like written as octal (\\040)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)
