"""CUDA MPS for a build: check that the daemon answers, and set the thread percentage."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from trtserve.service.backends.tensorrt.api import gpu_present
from trtserve.service.build.options import BuildError

MPS_PERCENTAGE_ENV = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"
MPS_PIPE_DIRECTORY_ENV = "CUDA_MPS_PIPE_DIRECTORY"
DEFAULT_MPS_PIPE_DIRECTORY = "/tmp/nvidia-mps"


@contextlib.contextmanager
def _mps_thread_percentage(percentage: int | None) -> Iterator[None]:
    """Set CUDA_MPS_ACTIVE_THREAD_PERCENTAGE while building, after checking MPS answers."""
    if percentage is None:
        yield
        return
    _require_mps_daemon()
    previous = os.environ.get(MPS_PERCENTAGE_ENV)
    os.environ[MPS_PERCENTAGE_ENV] = str(percentage)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(MPS_PERCENTAGE_ENV, None)
        else:
            os.environ[MPS_PERCENTAGE_ENV] = previous


def _require_mps_daemon() -> None:
    if not gpu_present():
        raise BuildError(
            "--mps-percentage needs an NVIDIA GPU with the MPS control daemon running; "
            "this machine has no NVIDIA GPU"
        )
    pipe_directory = Path(os.environ.get(MPS_PIPE_DIRECTORY_ENV, DEFAULT_MPS_PIPE_DIRECTORY))
    start_hint = "start it with `nvidia-cuda-mps-control -d` (see the README's MPS steps)"
    # The daemon listens on a pipe named `control` in its pipe directory.
    if not (pipe_directory / "control").exists():
        raise BuildError(
            f"--mps-percentage: no MPS control daemon answers in {pipe_directory} "
            f"(set {MPS_PIPE_DIRECTORY_ENV} if it uses another directory); {start_hint}"
        )
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        return  # The pipe exists; without the client tool there is nothing more to ask.
    try:
        reply = subprocess.run(
            [control],
            input="get_server_list\n",
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BuildError(
            f"--mps-percentage: the MPS control daemon in {pipe_directory} did not answer "
            f"within 10 s; {start_hint}"
        ) from None
    if reply.returncode != 0:
        said = (reply.stderr or reply.stdout).strip()
        raise BuildError(
            f"--mps-percentage: the MPS control daemon in {pipe_directory} did not answer "
            f"({said or f'exit code {reply.returncode}'}); {start_hint}"
        )
