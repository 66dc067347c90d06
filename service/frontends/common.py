"""What every frontend shares: the call's deadline, and the checks of a request's
tensors that come before any is decoded.

The frontends (trtserve.v1 and KServe v2) differ only in their messages; both
hand decoded arrays to the same `Engine.infer` (service/engine/api.py). The few
pieces of call handling they have in common live here so that neither copies
the other. Model versions are the engine's (api.check_version), re-exported here.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Iterable, Sequence
from typing import Protocol, TypeVar

import grpc

from trtserve.service import echo
from trtserve.service.engine.api import MODEL_VERSION, ModelSpec, check_version, now
from trtserve.service.errors import DeadlineExceeded, PermissionDenied, TensorError

__all__ = ["MODEL_VERSION", "answered_by", "check_inputs", "check_version", "deadline_of",
           "is_local_peer", "is_loopback_host", "require_local", "require_local_peer"]

T = TypeVar("T")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the serving clock (None: the client set none)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return now() + remaining


async def answered_by(deadline: float | None, call: Awaitable[T]) -> T:
    """`call`, cancelled when `deadline` (the serving clock) passes, for the deadlines
    gRPC does not enforce: KServe's `timeout` parameter, and every HTTP request.

    gRPC cancels a handler when its call's deadline passes, which takes the
    request out of its queue (or its batch, not yet run) at once. The engine
    alone only looks at a request's deadline when it forms a batch, so a request
    queued behind a long batch, or in a batch waiting out a long delay, would be
    answered late and hold what it uses (a shared-memory region, queue room)
    until then.
    """
    if deadline is None:
        return await call
    try:
        async with asyncio.timeout(deadline - now()):
            return await call
    except TimeoutError:
        raise DeadlineExceeded("the request's timeout (deadline) passed before it was answered") \
            from None


class WireTensor(Protocol):
    """An input tensor as either protocol's message carries it."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> Sequence[int]: ...


def check_inputs(model: str, spec: ModelSpec, tensors: Iterable[WireTensor]) -> None:
    """Refuse, before any tensor is decoded, inputs the model cannot take at all.

    Each input must have a name the model takes, appear once, and have the
    model's number of dimensions. A request can carry a million tensors (or
    dimensions) in a few megabytes; decoding them before looking at their names
    held the event loop for seconds. Here the n+1st tensor, for a model of n
    inputs, is either unknown or a repeat, so at most n+1 tensors are looked at,
    and a shape's length is compared before its dimensions are read.
    """
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        name = tensor.name
        if not name:
            raise TensorError("", f"input #{index} has an empty name")
        if name in seen:
            raise TensorError(name, "appears more than once in the request's inputs")
        tensor_spec = spec.input(name)
        if tensor_spec is None:
            raise TensorError(name, f"unknown input; model '{echo.text(model)}' takes "
                              f"{[t.name for t in spec.inputs]}")
        ndim, want = len(tensor.shape), len(tensor_spec.shape)
        if ndim != want:
            raise TensorError(name, f"shape {echo.dims(tensor.shape)} has {ndim} dimensions, "
                              f"the model takes {want}: {list(tensor_spec.shape)}")
        seen.add(name)


# Peers that share this host: gRPC names them "ipv4:127.x.x.x:port", "ipv6:[::1]:port"
# or "unix:path" (also "unix-abstract:").
def is_local_peer(peer: str) -> bool:
    """Whether a gRPC peer string names a caller on this host (loopback or Unix socket)."""
    kind, _, address = peer.partition(":")
    if kind in ("unix", "unix-abstract"):
        return True
    if kind == "ipv4":
        host = address.rsplit(":", 1)[0]
    elif kind == "ipv6":
        host = address.rsplit("]", 1)[0].lstrip("[")
    else:
        return False
    return is_loopback_host(host)


def is_loopback_host(host: str | None) -> bool:
    """Whether an IP address (as text) is this host's loopback, IPv4-mapped ones included."""
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def require_local_peer(context: grpc.aio.ServicerContext, allow_remote: bool, rpc: str) -> None:
    """Refuse a register RPC from another host (PERMISSION_DENIED), unless configured.

    A region is named by a key of this host's /dev/shm or a handle of this host's
    GPU; a remote caller naming one is either mistaken or probing the server's memory.
    """
    require_local(is_local_peer(context.peer() or ""), allow_remote, rpc)


def require_local(caller_is_local: bool, allow_remote: bool, rpc: str) -> None:
    """`require_local_peer` for any frontend: it says whether its caller is on this host."""
    if not allow_remote and not caller_is_local:
        raise PermissionDenied(
            f"{rpc} is taken only from callers on this host (loopback or a Unix socket); "
            "shared memory cannot be shared with another host (server.shared_memory."
            "allow_remote_register = true lifts this, e.g. behind a local proxy)")
