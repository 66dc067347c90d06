"""benchmarks/placement.py: the nice values and cores it sets reach every thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from benchmarks.placement import Placement, threads

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="pinning needs two usable cores")

# A process with a second thread, both asleep until stdin closes.
SLEEPER = ("import sys, threading; t = threading.Thread(target=sys.stdin.read); t.start(); "
           "print('ready', flush=True); t.join()")


def test_frontend_and_client_threads_get_the_nice_value_and_the_other_cores() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        tids = threads(proc.pid)
        assert len(tids) >= 2
        Placement(frontend_nice=3, engine_cpus=1).frontend(proc.pid)
        assert [os.getpriority(os.PRIO_PROCESS, t) for t in tids] == [3] * len(tids)
        assert all(os.sched_getaffinity(t) == set(cpus[:-1]) for t in tids)
    finally:
        proc.communicate("")


def test_the_engine_thread_and_those_it_starts_get_the_last_cores_until_restored() -> None:
    cpus = os.sched_getaffinity(0)
    seen: list[set[int]] = []
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)

    def pin_and_start() -> None:
        placement = Placement(engine_cpus=1)
        restore = placement.before_engine()
        started = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0)))
        started.start()
        started.join()
        seen.append(os.sched_getaffinity(0))
        # Placed from the pinned thread, as the benchmark does: the rest of the cores.
        placement.client(proc.pid)
        seen.append(os.sched_getaffinity(proc.pid))
        assert restore is not None
        os.sched_setaffinity(0, restore)
        seen.append(os.sched_getaffinity(0))

    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        runner = threading.Thread(target=pin_and_start)
        runner.start()
        runner.join()
    finally:
        proc.communicate("")
    last = {max(cpus)}
    assert seen == [last, last, cpus - last, cpus]


def test_pinning_every_core_to_the_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="usable cores"):
        Placement(engine_cpus=len(os.sched_getaffinity(0))).before_engine()
