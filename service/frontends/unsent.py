"""Answers handed to gRPC that their client has not read yet, counted by connection.

grpc.aio keeps a call's answer until HTTP/2 flow control lets it out, and a client
whose receive window stays shut never lets it out: each answer it asks for stays in
this process until the connection closes. Without a bound, one connection asking for
a few hundred 4 MiB answers held gigabytes (an adversarial run: 200 unary calls on
one connection took a frontend from 71 MiB to 3.3 GiB). Per-stream limits
(frontends/streaming.py) do not help: a connection carries up to
`max_concurrent_streams` calls and streams.

So every answer of `TRACK_FROM_BYTES` or more is held in this ledger from when it is
ready until gRPC is done with its call (or, on a stream, has taken it), and checked
twice:

- before a request runs: a connection that holds `per_connection` bytes or more, or
  holds at least an equal share of what the process holds while that is past `total`,
  has the request refused (RESOURCE_EXHAUSTED) without running it;
- when its answer is ready: an answer that would take its connection past twice
  `per_connection` (the requests admitted while it held less can all finish), or the
  process past `total` while its connection holds at least an equal share, is not
  sent; the call (or that stream request) ends RESOURCE_EXHAUSTED instead, a status
  that needs no flow-control window, so gRPC lets the call go.

A connection holding nothing always gets its request run and its answer sent (one
answer's size is max_send_message_bytes' business). A client that reads its answers
as they come holds only what is on its way at any moment; one that keeps more than
`per_connection` bytes of answers outstanding on one connection is told to slow down.

A connection is gRPC's peer address ("ipv4:10.0.0.7:51234"): each TCP connection its
own. Clients over a Unix socket share one peer name, and so one allowance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import grpc

from trtserve.service.engine.api import ModelSpec
from trtserve.service.errors import ResourceExhausted
from trtserve.service.frontends.common import WireTensor

MIB = 1024 * 1024
# Smaller answers are not counted: the ledger's two dict updates would cost more than
# they bound (a connection's calls in flight are limited by max_concurrent_streams).
TRACK_FROM_BYTES = 64 * 1024

Release = Callable[[], None]


@dataclass(frozen=True)
class UnsentLimits:
    """`server.max_unsent_bytes_per_connection` and `server.max_unsent_bytes`."""

    per_connection: int = 256 * MIB
    total: int = 1024 * MIB


class UnsentAnswers:
    """Bytes of answers not yet sent, by connection (event loop owned)."""

    def __init__(self, limits: UnsentLimits = UnsentLimits(),
                 on_sent: Callable[[int], None] | None = None) -> None:
        self.limits = limits
        # Called with an answer's size once gRPC is done with it (the server gives large
        # answers' memory back to the system then: service/memory.py).
        self._on_sent = on_sent
        self.total = 0
        # Since the start: requests refused before they ran, answers not sent.
        self.refused_requests = 0
        self.refused_answers = 0
        self._held: dict[str, int] = {}

    def held(self, peer: str) -> int:
        return self._held.get(peer, 0)

    def check(self, peer: str) -> None:
        """Before `peer`'s request runs: ResourceExhausted if it holds too much already."""
        held = self._held.get(peer, 0)
        if not held:
            return
        if held >= self.limits.per_connection:
            self._refuse_request(
                f"the request was not run: this connection holds {held} bytes of "
                "answers it has not read yet, the most it may "
                f"({self.limits.per_connection}, "
                "server.max_unsent_bytes_per_connection)"
            )
        if self.total >= self.limits.total and self._holds_its_share(held, 0):
            self._refuse_request(
                f"the request was not run: the server holds {self.total} bytes of "
                f"answers its clients have not read yet, past "
                f"{self.limits.total} (server.max_unsent_bytes), this connection "
                f"{held} of them"
            )

    def check_call(self, context: grpc.aio.ServicerContext) -> None:
        """`check` for a unary call (context.peer() only while anything is held)."""
        if self._held:
            self.check(context.peer())

    def hold(self, peer: str, size: int) -> Release | None:
        """Count `size` bytes of an answer for `peer` until the callable returned is called
        (None: too small to count). ResourceExhausted: the answer may not be sent."""
        if size < TRACK_FROM_BYTES:
            return None
        held = self._held.get(peer, 0)
        if held:
            if held + size > 2 * self.limits.per_connection:
                self._refuse_answer(
                    f"the answer ({size} bytes) was not sent: this connection "
                    f"holds {held} bytes of answers it has not read yet "
                    f"(server.max_unsent_bytes_per_connection: "
                    f"{self.limits.per_connection}, and answers of requests "
                    "already running up to twice that)"
                )
            if self.total + size > self.limits.total and self._holds_its_share(held, size):
                self._refuse_answer(
                    f"the answer ({size} bytes) was not sent: the server holds "
                    f"{self.total} bytes of answers its clients have not read yet "
                    f"({self.limits.total} at most, server.max_unsent_bytes), "
                    f"this connection {held} of them"
                )
        self._held[peer] = held + size
        self.total += size
        return self._releaser(peer, size, sent=self._on_sent)

    def _releaser(self, peer: str, size: int,
                  sent: Callable[[int], None] | None) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= size
            left = self._held[peer] - size
            if left:
                self._held[peer] = left
            else:
                del self._held[peer]
            if sent is not None:
                sent(size)

        return release

    def reserve(self, context: grpc.aio.ServicerContext, size: int) -> Release | None:
        """Count the `size` bytes a request's answer is expected to hold while it runs (the
        caller gives them back once the answer is there, and `hold`s what it holds), so
        that the requests a connection sends at once count before their answers exist.
        No check: `check` let the request in."""
        if size < TRACK_FROM_BYTES:
            return None
        peer = context.peer()
        self._held[peer] = self._held.get(peer, 0) + size
        self.total += size
        return self._releaser(peer, size, sent=None)

    def hold_call(self, context: grpc.aio.ServicerContext, size: int) -> None:
        """`hold` a unary call's answer until gRPC is done with the call."""
        if size < TRACK_FROM_BYTES:
            return  # before context.peer(): most answers are small
        release = self.hold(context.peer(), size)
        if release is not None:
            # grpc-stubs types the callback as a class of its own, not a callable.
            context.add_done_callback(lambda _: release())  # type: ignore[arg-type]

    def connection(self, context: grpc.aio.ServicerContext) -> Connection:
        return Connection(self, context.peer())

    def _holds_its_share(self, held: int, size: int) -> bool:
        # At least what every holding connection would hold if the total were spread evenly.
        return held * len(self._held) >= self.total + size

    def _refuse_request(self, why: str) -> None:
        self.refused_requests += 1
        raise ResourceExhausted(f"{why}; read answers as they come")

    def _refuse_answer(self, why: str) -> None:
        self.refused_answers += 1
        raise ResourceExhausted(f"{why}; read answers as they come")


class Connection:
    """One connection's share of the ledger, as a stream uses it."""

    def __init__(self, ledger: UnsentAnswers, peer: str) -> None:
        self._ledger = ledger
        self._peer = peer

    def check(self) -> None:
        self._ledger.check(self._peer)

    def hold(self, size: int) -> Release | None:
        return self._ledger.hold(self._peer, size)


class Expected(NamedTuple):
    """What a request's answer is expected to hold before it runs."""

    bytes: int  # from the model's declared output shapes
    exact: bool  # every output's shape is fixed by them (no other dynamic dimension)

    @property
    def may_be_large(self) -> bool:
        """Whether its answer may reach TRACK_FROM_BYTES (else it need not be weighed)."""
        return not self.exact or self.bytes >= TRACK_FROM_BYTES


# Per model spec: (the spec, bytes per row, exact), so that a request without region
# outputs costs a multiplication (specs are few and long-lived).
_PER_SPEC: dict[int, tuple[ModelSpec, int, bool]] = {}


def expected_answer_bytes(spec: ModelSpec, tensors: Iterable[WireTensor],
                          in_regions: Collection[str]) -> Expected:
    """The bytes a request's outputs will hold, where the model's declared shapes fix them
    (every output the engine returns, but those written into the client's regions; an
    output with another dynamic dimension counts once it exists, in `hold`)."""
    rows = 1
    if spec.batching:
        first = next(iter(tensors), None)
        if first is None or not first.shape:
            return Expected(0, False)
        # More rows than the model takes is refused before it runs.
        rows = min(max(first.shape[0], 0), spec.max_batch_size)
    if in_regions:
        return _expected(spec, rows, in_regions)
    cached = _PER_SPEC.get(id(spec))
    if cached is None or cached[0] is not spec:
        if len(_PER_SPEC) > 1024:
            _PER_SPEC.clear()
        per_row, exact = _expected(spec, 1, ())
        cached = _PER_SPEC[id(spec)] = (spec, per_row, exact)
    return Expected(rows * cached[1], cached[2])


def _expected(spec: ModelSpec, rows: int, in_regions: Collection[str]) -> Expected:
    size, exact = 0, True
    for output in spec.outputs:
        if output.name in in_regions:
            continue
        shape = list(output.shape)
        if spec.batching:
            if not shape:
                exact = False
                continue
            shape[0] = rows
        if min(shape, default=0) >= 0:
            size += math.prod(shape) * output.np_dtype.itemsize
        else:
            exact = False
    return Expected(size, exact)
