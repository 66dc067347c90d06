"""A cgroup's CPU quota (a container's `--cpus`, a Kubernetes CPU limit) counts as the
cores the server may use: `frontends = auto` and ONNX Runtime's threads are sized by it.

Two kinds of test: the cgroup files' formats, laid out under a temporary directory as
the kernel writes them (v2 and v1, nested, in and out of a cgroup namespace); and, where
this machine lets us create a cgroup, real processes inside one with a quota."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from trtserve.client import Client
from trtserve.service import cpus
from trtserve.service.config import ServerConfig
from trtserve.service.testing.servers import ROOT, ServerProcess

AFFINITY = len(os.sched_getaffinity(0))


def hierarchy(tmp_path: Path, mount: str, membership: str, limits: dict[str, str]
              ) -> tuple[str, str]:
    """/proc/self/cgroup and /proc/self/mountinfo for one hierarchy mounted at
    tmp_path/cg: `mount` is mountinfo's line with {point} for the mount point;
    `limits`: file (relative to the mount point) -> contents."""
    point = tmp_path / "cg"
    for name, text in limits.items():
        (point / name).parent.mkdir(parents=True, exist_ok=True)
        (point / name).write_text(text + "\n")
    point.mkdir(parents=True, exist_ok=True)
    (tmp_path / "cgroup").write_text(membership + "\n")
    (tmp_path / "mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        + mount.format(point=str(point).replace(" ", "\\040")) + "\n")
    return str(tmp_path / "cgroup"), str(tmp_path / "mountinfo")


V2 = "30 23 0:28 / {point} rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw,nsdelegate"


def test_v2_a_parents_limit_binds_its_children(tmp_path: Path) -> None:
    """A Kubernetes pod's limit sits on the pod's cgroup; the container's own may be
    unlimited or looser: the lowest on the way up counts."""
    files = hierarchy(tmp_path, V2, "0::/kubepods/pod1/ctr", {
        "kubepods/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "250000 100000",
        "kubepods/pod1/ctr/cpu.max": "400000 100000",
    })
    assert cpus.cpu_quota(*files) == 2.5


def test_v2_in_a_cgroup_namespace_the_mount_is_the_containers_cgroup(tmp_path: Path) -> None:
    files = hierarchy(tmp_path, V2, "0::/", {"cpu.max": "50000 100000"})
    assert cpus.cpu_quota(*files) == 0.5


def test_no_limit_anywhere_is_none(tmp_path: Path) -> None:
    files = hierarchy(tmp_path, V2, "0::/a/b", {"a/cpu.max": "max 100000",
                                                  "a/b/cpu.max": "max 100000"})
    assert cpus.cpu_quota(*files) is None
    # The root cgroup has no cpu.max at all.
    assert cpus.cpu_quota(*hierarchy(tmp_path / "root", V2, "0::/", {})) is None


def test_v1_docker_without_a_cgroup_namespace(tmp_path: Path) -> None:
    """The host's path in /proc/self/cgroup, the container's cgroup as the mount's root."""
    files = hierarchy(
        tmp_path, "40 31 0:35 /docker/abc {point} rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        "4:cpu,cpuacct:/docker/abc", {"cpu.cfs_quota_us": "150000",
                                      "cpu.cfs_period_us": "100000"})
    assert cpus.cpu_quota(*files) == 1.5


def test_v1_minus_one_is_no_quota(tmp_path: Path) -> None:
    files = hierarchy(tmp_path, "32 31 0:29 / {point} rw - cgroup cgroup rw,cpu",
                      "1:cpu:/svc", {"svc/cpu.cfs_quota_us": "-1",
                                     "svc/cpu.cfs_period_us": "100000"})
    assert cpus.cpu_quota(*files) is None


def test_hybrid_the_v1_cpu_controller_holds_the_limit(tmp_path: Path) -> None:
    """cgroup v1 controllers beside an empty v2 hierarchy (systemd's hybrid layout)."""
    files = hierarchy(tmp_path, "32 31 0:29 / {point} rw - cgroup cgroup rw,cpu",
                      "1:cpu:/svc\n2:memory:/svc\n0::/svc",
                      {"svc/cpu.cfs_quota_us": "300000", "svc/cpu.cfs_period_us": "100000"})
    unified = tmp_path / "unified"
    (unified / "svc").mkdir(parents=True)
    with open(files[1], "a") as f:
        f.write(f"41 31 0:38 / {unified} rw - cgroup2 cgroup2 rw\n")
    assert cpus.cpu_quota(*files) == 3.0


def test_a_cgroup_outside_the_mounts_root_is_not_read(tmp_path: Path) -> None:
    """Another namespace's view ("/../x"), or a path the mount does not hold."""
    files = hierarchy(tmp_path, "40 31 0:35 /docker/abc {point} rw - cgroup2 cgroup2 rw",
                      "0::/docker/other", {"cpu.max": "100000 100000"})
    assert cpus.cpu_quota(*files) is None
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # what "/.." would reach
    files = hierarchy(tmp_path, V2, "0::/../sibling", {"cpu.max": "max 100000"})
    assert cpus.cpu_quota(*files) is None


def test_a_mount_point_with_a_space(tmp_path: Path) -> None:
    files = hierarchy(tmp_path / "with space", V2, "0::/", {"cpu.max": "200000 100000"})
    assert cpus.cpu_quota(*files) == 2.0


def test_unreadable_or_malformed_files_are_no_quota(tmp_path: Path) -> None:
    assert cpus.cpu_quota(str(tmp_path / "nosuch"), str(tmp_path / "nosuch")) is None
    files = hierarchy(tmp_path, V2, "0::/", {"cpu.max": "lots 100000"})
    assert cpus.cpu_quota(*files) is None
    (tmp_path / "mountinfo").write_text("garbage\n\n30 23 0:28 / x\n")
    assert cpus.cpu_quota(*files) is None


@pytest.mark.parametrize(("quota", "want"), [
    (None, AFFINITY), (0.2, 1), (1.0, 1), (1.5, min(AFFINITY, 2)), (1000.0, AFFINITY)])
def test_usable_rounds_a_quota_up_and_never_past_the_affinity(
        monkeypatch: pytest.MonkeyPatch, quota: float | None, want: int) -> None:
    monkeypatch.setattr(cpus, "cpu_quota", lambda: quota)
    assert cpus.usable() == want


@pytest.mark.parametrize(("setting", "quota", "want"), [
    ("auto", None, 1000), ("auto", 2.0, 0), (250, 2.0, 250), (0, None, 0)])
def test_both_ends_of_the_link_poll_unless_a_quota_would_pay_for_it(
        monkeypatch: pytest.MonkeyPatch, setting: int | str, quota: float | None,
        want: int) -> None:
    monkeypatch.setattr(cpus, "cpu_quota", lambda: quota)
    monkeypatch.setattr(cpus, "usable", lambda: 16)
    assert ServerConfig(frontend_spin_us=setting).resolved_frontend_spin_us == want
    assert ServerConfig(engine_spin_us=setting).resolved_engine_spin_us == want


@pytest.mark.parametrize(("cores", "want"), [(2, 0), (3, 0), (4, 1000), (8, 1000), (64, 1000)])
def test_the_engine_polls_by_default_only_where_cores_are_left_for_it(
        monkeypatch: pytest.MonkeyPatch, cores: int, want: int) -> None:
    """On 2 cores the engine's poll competed with the frontends and the client (its p90
    rose); on 4, 6 and 16 it lowered the cost of frontends at concurrency 1. Set, it
    polls anywhere."""
    monkeypatch.setattr(cpus, "cpu_quota", lambda: None)
    monkeypatch.setattr(cpus, "usable", lambda: cores)
    assert ServerConfig().resolved_engine_spin_us == want
    assert ServerConfig(engine_spin_us=500).resolved_engine_spin_us == 500
    assert ServerConfig().resolved_frontend_spin_us == 1000  # the frontend's: any host


# --- real cgroups ------------------------------------------------------------------------


def _writable_cpu_cgroup() -> tuple[Path, int] | None:
    """This process's cgroup directory in a hierarchy with the CPU controller, if a
    child cgroup with a quota can be made there (root in a container that allows it)."""
    try:
        membership = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for directory, _, version in cpus._cpu_cgroups(membership, mounts):
        probe = directory / f"trtserve-probe-{os.getpid()}"
        try:
            probe.mkdir()
        except OSError:
            continue
        try:
            if (probe / ("cpu.max" if version == 2 else "cpu.cfs_quota_us")).exists():
                return directory, version
        finally:
            probe.rmdir()
    return None


WRITABLE = _writable_cpu_cgroup()
needs_cgroup = pytest.mark.skipif(WRITABLE is None, reason="cannot create a cgroup with a "
                                  "CPU quota here (needs root and a writable cgroup mount)")


@pytest.fixture
def quota_cgroup() -> Iterator[Callable[..., Path]]:
    """Make a child cgroup (of this process's, or of `under`) with a CPU quota of
    `cores` (0: none of its own); removed after the test (its processes have exited
    by then)."""
    assert WRITABLE is not None
    parent, version = WRITABLE
    made: list[Path] = []

    def make(cores: float, under: Path | None = None) -> Path:
        cgroup = (under or parent) / f"trtserve-test-{os.getpid()}-{len(made)}"
        cgroup.mkdir()
        made.append(cgroup)
        if cores:
            if version == 2:
                (cgroup / "cpu.max").write_text(f"{int(cores * 100_000)} 100000")
            else:
                (cgroup / "cpu.cfs_period_us").write_text("100000")
                (cgroup / "cpu.cfs_quota_us").write_text(str(int(cores * 100_000)))
        return cgroup

    yield make
    for cgroup in reversed(made):
        cgroup.rmdir()


def entering(cgroup: Path) -> Callable[[], None]:
    """For preexec_fn: move the child into `cgroup` before it runs anything."""
    def enter() -> None:
        (cgroup / "cgroup.procs").write_text("0")  # 0: the writing process
    return enter


PROBE = ("from trtserve.service import cpus, config; "
         "c = config.ServerConfig(engine_spin_us='auto'); "
         "print(cpus.cpu_quota(), cpus.usable(), c.resolved_frontends, "
         "c.resolved_frontend_spin_us, c.resolved_engine_spin_us)")


@needs_cgroup
def test_a_process_in_a_cgroup_with_a_quota_counts_it(quota_cgroup) -> None:
    limited = quota_cgroup(0.5)
    inner = quota_cgroup(0, under=limited)  # no quota of its own: its parent's binds
    for where in (limited, inner):
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True,
                             text=True, check=True, preexec_fn=entering(where)).stdout.split()
        # Rounded up, at least one core; no polling that would spend the quota.
        assert out == ["0.5", "1", "1", "0", "0"]
    # And outside it, this test's own process: no quota on its cgroup.
    assert cpus.cpu_quota() is None and cpus.usable() == AFFINITY


@needs_cgroup
def test_serve_under_a_quota_says_so_warns_of_too_many_frontends_and_serves(
        quota_cgroup, example_onnx: Path) -> None:
    """2 frontends on half a core: the server counts 1 usable core, says that more
    frontends than that will be throttled, and serves exactly anyway."""
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2",
                            "--workers", "1"], preexec=entering(quota_cgroup(0.5)))
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    want = session.run(None, {"input": x})[0]
    with server.serving(timeout=120), Client(server.url) as client:
        got = next(iter(client.infer("example", {"input": x}, timeout=30).values()))
    np.testing.assert_array_equal(got, want)
    output = server.output()
    assert "a CPU quota of 0.5 cores: counting 1 usable core (" in output, output
    assert "frontends poll for a lone reply for 0 us, the engine for the next request " \
        "for 0 us" in output, output
    assert "2 frontends on a CPU quota of 0.5 cores: they will be throttled" in output, output
