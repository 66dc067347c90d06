"""Answers a client has not read yet, and answers still being computed, by connection.

grpc.aio keeps a call's answer until HTTP/2 flow control lets it out, and a client
whose receive window stays shut never lets it out: each answer it asks for stays in
this process until the connection closes. Without a bound, one connection asking for
a few hundred 4 MiB answers held gigabytes (an adversarial run: 200 unary calls on
one connection took a frontend from 71 MiB to 3.3 GiB). Per-stream limits
(frontends/streaming.py) do not help: a connection carries up to
`max_concurrent_streams` calls and streams.

So every answer of `TRACK_FROM_BYTES` or more counts in this ledger from when its
request starts running (the bytes the model's declared output shapes give it, at most
`max_answer`) until gRPC is done with its call (or, on a stream, has taken it), and is
checked twice, as `max_request_bytes_in_flight` checks inputs:

- before a request runs: if its connection holds `per_connection` bytes or more, or
  the process holds `total` or more, it is refused (RESOURCE_EXHAUSTED) without
  running;
- when its answer is ready: an answer that would take its connection past twice
  `per_connection`, or the process past twice `total` (room for the requests let in
  below the limits), is not sent; the call (or that stream request) ends
  RESOURCE_EXHAUSTED instead, a status that needs no flow-control window, so gRPC
  lets the call go.

A client that reads its answers as they come holds only what is running or on its
way; one that keeps more than `per_connection` bytes outstanding on one connection is
told to read first. The process's limit bounds memory against many connections, each
holding a little: past it, large answers wait for room whoever asks (small ones, under
TRACK_FROM_BYTES, are never refused).

A connection is gRPC's peer address ("ipv4:10.0.0.7:51234"): each TCP connection its
own. Clients over a Unix socket share one peer name, and so one allowance. The peer
is read while its call is live, never later: grpc.aio's `context.peer()` on a call
that has ended reads freed memory (a stream's request tasks can outlive their call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import grpc

from trtserve.service.engine.api import ModelSpec
from trtserve.service.errors import ResourceExhausted

MIB = 1024 * 1024
# Smaller answers are not counted: the ledger's two dict updates would cost more than
# they bound (a connection's calls in flight are limited by max_concurrent_streams).
TRACK_FROM_BYTES = 64 * 1024

Release = Callable[[], None]


@dataclass(frozen=True)
class UnsentLimits:
    """`server.max_unsent_bytes_per_connection`, `server.max_unsent_bytes`, and the most
    one answer counts while it runs (`server.max_send_message_bytes`: a larger one is
    refused anyway, and a model may declare far larger outputs than it gives)."""

    per_connection: int = 256 * MIB
    total: int = 1024 * MIB
    max_answer: int = 256 * MIB


class UnsentAnswers:
    """Bytes of answers running or not yet sent, by connection (event loop owned)."""

    def __init__(self, limits: UnsentLimits = UnsentLimits(),
                 on_sent: Callable[[int], None] | None = None) -> None:
        self.limits = limits
        self.total = 0
        # Since the start: requests refused before they ran, answers not sent.
        self.refused_requests = 0
        self.refused_answers = 0
        # Called with an answer's size once gRPC is done with it (the server gives large
        # answers' memory back to the system then: service/memory.py).
        self._on_sent = on_sent
        self._held: dict[str, int] = {}

    def held(self, peer: str) -> int:
        return self._held.get(peer, 0)

    def check(self, peer: str) -> None:
        """Before `peer`'s request runs: ResourceExhausted if it may not."""
        if not self.total:
            return
        held = self._held.get(peer, 0)
        if held >= self.limits.per_connection:
            self.refused_requests += 1
            raise ResourceExhausted(
                f"the request was not run: this connection has {held} bytes of answers "
                f"not read yet or being computed, the most it may "
                f"({self.limits.per_connection}, server.max_unsent_bytes_per_connection); "
                "read answers as they come")
        if self.total >= self.limits.total:
            self.refused_requests += 1
            raise ResourceExhausted(
                f"the request was not run: the server holds {self.total} bytes of answers "
                f"not read yet or being computed, the most it may ({self.limits.total}, "
                f"server.max_unsent_bytes); try again later")

    def reserve(self, peer: str, size: int) -> Release | None:
        """Count the bytes a request's answer is expected to hold while it runs (at most
        `max_answer`); the caller gives them back once the answer is there and `hold`s
        what it holds. No check: `check` let the request in."""
        size = min(size, self.limits.max_answer)
        if size < TRACK_FROM_BYTES:
            return None
        self._add(peer, size)
        return self._releaser(peer, size, sent=None)

    def hold(self, peer: str, size: int) -> Release | None:
        """Count `size` bytes of a ready answer for `peer` until the callable returned is
        called (None: too small to count). ResourceExhausted: it may not be sent."""
        if size < TRACK_FROM_BYTES:
            return None
        held = self._held.get(peer, 0)
        if held and held + size > 2 * self.limits.per_connection:
            self.refused_answers += 1
            raise ResourceExhausted(
                f"the answer ({size} bytes) was not sent: this connection has {held} bytes "
                f"of answers not read yet (server.max_unsent_bytes_per_connection: "
                f"{self.limits.per_connection}; answers of requests already running may "
                "take it to twice that); read answers as they come")
        if self.total and self.total + size > 2 * self.limits.total:
            self.refused_answers += 1
            raise ResourceExhausted(
                f"the answer ({size} bytes) was not sent: the server holds {self.total} "
                f"bytes of answers not read yet (server.max_unsent_bytes: "
                f"{self.limits.total}; answers of requests already running may take it to "
                "twice that); try again later")
        self._add(peer, size)
        return self._releaser(peer, size, sent=self._on_sent)

    def hold_call(self, context: grpc.aio.ServicerContext, connection: Connection,
                  size: int) -> None:
        """`hold` a unary call's answer until gRPC is done with the call; in its handler."""
        release = connection.hold(size)
        if release is not None:
            # grpc-stubs types the callback as a class of its own, not a callable.
            context.add_done_callback(lambda _: release())  # type: ignore[arg-type]

    def connection(self, peer: str | Callable[[], str]) -> Connection:
        return Connection(self, peer)

    def _add(self, peer: str, size: int) -> None:
        self._held[peer] = self._held.get(peer, 0) + size
        self.total += size

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


class Connection:
    """One connection's share of the ledger. `peer`: its address, or a callable giving it
    (a unary handler's `context.peer`, read once, on first need, while the call is live);
    a stream reads it when it starts, since its request tasks can outlive the call."""

    def __init__(self, ledger: UnsentAnswers, peer: str | Callable[[], str]) -> None:
        self._ledger = ledger
        self._peer = peer

    @property
    def peer(self) -> str:
        if not isinstance(self._peer, str):
            self._peer = self._peer()
        return self._peer

    def check(self) -> None:
        if self._ledger.total:
            self._ledger.check(self.peer)

    def reserve(self, size: int) -> Release | None:
        if size < TRACK_FROM_BYTES:
            return None
        return self._ledger.reserve(self.peer, size)

    def hold(self, size: int) -> Release | None:
        if size < TRACK_FROM_BYTES:
            return None
        return self._ledger.hold(self.peer, size)


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


class Shaped(Protocol):
    """An input as the wire gives it: only its shape is read here."""

    @property
    def shape(self) -> Sequence[int]: ...


def expected_answer_bytes(spec: ModelSpec, tensors: Iterable[Shaped],
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
