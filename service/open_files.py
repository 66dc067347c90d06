"""The open-file limit: every client connection holds a file descriptor.

Linux starts most processes with a soft limit of 1,024 open files, kept low for
programs that watch files with select() (which cannot go past 1,024), and a hard
limit far above it (524,288 under systemd, 1,048,576 in Docker and containerd).
trtserve never uses select(): gRPC and the event loops use epoll. So at start it
raises the soft limit to the hard one, as Go and the JVM do. With 1,024, a client
that opened about a thousand connections and sent nothing on them left the server
unable to accept any other client's (docs/reliability.md, "Connections"). The
frontend processes and the metrics process inherit the raised limit.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

# Below this many open files, a start warns that connections can exhaust them.
LOW = 16_384


@dataclass(frozen=True)
class OpenFiles:
    before: int  # the soft limit the process started with
    limit: int  # the soft limit now
    error: str = ""  # why it could not be raised, if it could not


def raise_to_hard() -> OpenFiles:
    """Raise the soft RLIMIT_NOFILE to the hard limit (or the kernel's per-process
    ceiling when the hard limit is unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _kernel_ceiling()
    if soft != resource.RLIM_INFINITY and soft >= target:
        return OpenFiles(soft, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        return OpenFiles(soft, soft, str(e))
    return OpenFiles(soft, target)


def _kernel_ceiling() -> int:
    """fs.nr_open: the most a process may set (1,048,576 unless changed)."""
    try:
        return int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        return 1_048_576
