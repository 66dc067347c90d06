"""benchmarks/placement.py: the nice values and cores it sets reach every thread."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from benchmarks.placement import Placement
from trtserve.service import cpus

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                                reason="pinning needs two usable cores")

# A process with a second thread, both asleep until stdin closes.
SLEEPER = ("import sys, threading; t = threading.Thread(target=sys.stdin.read); t.start(); "
           "print('ready', flush=True); t.join()")


@pytest.fixture
def sleeper() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        assert len(cpus.threads(proc.pid)) >= 2
        yield proc.pid
    finally:
        proc.communicate("")


def test_frontend_threads_get_the_nice_value(sleeper: int) -> None:
    Placement(frontend_nice=3).frontend(sleeper)
    assert [os.getpriority(os.PRIO_PROCESS, t) for t in cpus.threads(sleeper)] == [3, 3]


def test_the_engine_gets_the_last_cores_and_the_clients_the_rest_even_once_pinned(
        sleeper: int) -> None:
    usable = frozenset(os.sched_getaffinity(0))
    placement = Placement(engine_cpus=1)
    last = max(usable)
    assert placement.server_options() == {"engine_cpus": str(last)}
    try:
        # As the server pins this process: the split still shares out every core.
        cpus.pin_process(frozenset({last}))
        placement.client(sleeper)
        assert {frozenset(os.sched_getaffinity(t)) for t in cpus.threads(sleeper)} == \
            {usable - {last}}
    finally:
        placement.restore()
    assert {frozenset(os.sched_getaffinity(t)) for t in cpus.threads(os.getpid())} == {usable}


def test_no_pinning_sets_nothing() -> None:
    assert Placement().server_options() == {}


def test_pinning_every_core_to_the_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="usable cores"):
        Placement(engine_cpus=len(os.sched_getaffinity(0))).server_options()
