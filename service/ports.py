"""Listening addresses: refuse one another process holds, before gRPC binds it.

gRPC sets SO_REUSEPORT on its listeners by default. Linux then lets a second
process bind a port the first one listens on, and splits new connections
between the two: a second `trtserve serve` on a busy port would start quietly
and take part of the first one's traffic. trtserve binds with SO_REUSEPORT off
(`GRPC_OPTIONS`) and probes each address first with a plain socket, which
fails with EADDRINUSE while anyone listens there, so the refusal names the
port and the key that set it.

A server of several processes calls `check_free` once, in its parent, before
its own frontend processes bind the port together with SO_REUSEPORT on.
"""

from __future__ import annotations

import errno
import socket

from trtserve.service.errors import ConfigError, PortInUse

# gRPC channel argument: our listener does not share its port with other processes.
GRPC_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.so_reuseport", 0),)

# Errors of one address of several (e.g. localhost's ::1 where IPv6 is off): skipped
# as long as one address of the host can be bound.
_UNAVAILABLE = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)


def check_free(host: str, port: int, key: str) -> None:
    """Raise PortInUse when another process listens on `host:port`.

    `key` is the setting that chose the port ("server.port"), named in the
    error. Port 0 (any free port) is always free. Raises ConfigError when
    `host` does not resolve or is no address of this machine.
    """
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"server.host: cannot resolve {host!r}: {e.strerror}") from None
    bound, unavailable = 0, ""
    for family, kind, proto, _, address in addresses:
        try:
            _probe(family, kind, proto, address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"{key}: {_show(host, port)} is in use by another process; stop that "
                    f"process or choose another port") from None
            if e.errno == errno.EACCES:
                raise PortInUse(
                    f"{key}: binding {_show(host, port)} is not permitted (ports below 1024 "
                    f"need privileges); choose a port from 1024 up") from None
            if e.errno not in _UNAVAILABLE:
                raise
            unavailable = e.strerror or str(e)
            continue
        bound += 1
    if not bound:
        raise ConfigError(f"server.host: cannot listen on {host!r} ({unavailable}): it is "
                          "not an address of this machine")


def _probe(family: int, kind: int, proto: int, address: tuple[object, ...]) -> None:
    with socket.socket(family, kind, proto) as s:
        # As gRPC binds: a port left in TIME_WAIT by a server that just exited is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host.strip("[]") else f"{host}:{port}"


def reserve(host: str, port: int, key: str) -> list[socket.socket]:
    """Bind (without listening) every address of host:port with SO_REUSEPORT, for a
    server whose frontend processes will bind the port together.

    The frontends bind the same port with SO_REUSEPORT; a server that is not ours
    finds the port held. Port 0 picks one free port for all of them. SO_REUSEADDR
    as well, as every listener here has it: without it a connection of the last
    server on this port, still in TIME_WAIT, refused the start for a minute (a
    server with one frontend, stopped, then started with two). A listening socket
    is refused either way. `key` names the port in errors.
    """
    addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    reserved: list[socket.socket] = []
    for family, kind, proto, _, address in addresses:
        s = socket.socket(family, kind, proto)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            s.bind((address[0], port, *address[2:]))
        except OSError as e:
            s.close()
            if e.errno in _UNAVAILABLE:
                continue
            for held in reserved:
                held.close()
            raise PortInUse(f"{key}: cannot bind {_show(host, port)}: {e.strerror}") from None
        port = s.getsockname()[1]
        reserved.append(s)
    if not reserved:
        raise PortInUse(f"{key}: cannot bind {_show(host, port)}")
    return reserved
