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

import os
import resource
import time
from dataclasses import dataclass

# Below this many open files, a start warns that connections can exhaust them.
LOW = 16_384


@dataclass(frozen=True)
class OpenFiles:
    before: int  # the soft limit the process started with
    limit: int  # the soft limit now
    error: str = ""  # why it could not be raised, if it could not


def raise_to_hard() -> OpenFiles:
    """Raise the soft RLIMIT_NOFILE to the hard limit. (Linux never reports an unlimited
    hard limit for open files: it is bounded by fs.nr_open. Elsewhere an unlimited one
    is left alone.)"""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return OpenFiles(soft, soft)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as e:
        return OpenFiles(soft, soft, str(e))
    return OpenFiles(soft, hard)


# Files a process keeps for itself besides client connections: models, shared-memory
# segments, the links between processes, logs.
OWN_FILES = 256


def connection_cap(wanted: int, http_connections: int) -> int:
    """The gRPC connections this process may hold: `wanted` (0: as many as fit), lowered
    so that they fit the open-file limit beside the process's own files and its HTTP
    connections (`http_connections`, at most half of what is left). Past the limit gRPC
    could accept no one's connection and the server could open no file; at the cap only
    the one more connection is closed."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    room = soft - OWN_FILES
    room -= min(http_connections, room // 2)
    room = max(1, room)
    return min(wanted, room) if wanted else room


class Held:
    """How many files a process of this host holds open (0 once it is gone), for Stats.

    Linux 6.2 and later give the count as the size of /proc/PID/fd: 0.2 ms at 10,000
    files. Older kernels report a size of 0 and need the folder listed: 12 ms there, on
    the engine's loop, for each frontend in each Stats snapshot, which clients calling
    Stats in a loop would keep asking for. So a listed count is reused for
    `listed_ttl_s`."""

    def __init__(self, pid: int, listed_ttl_s: float = 1.0) -> None:
        self.pid = pid
        self.listed_ttl_s = listed_ttl_s
        self._listed = 0
        self._listed_until = 0.0  # time.monotonic() until which _listed is reused

    def count(self) -> int:
        folder = f"/proc/{self.pid}/fd"
        try:
            if size := os.stat(folder).st_size:
                return size
            now = time.monotonic()
            if now >= self._listed_until:
                self._listed = len(os.listdir(folder))
                self._listed_until = now + self.listed_ttl_s
            return self._listed
        except OSError:
            return 0
