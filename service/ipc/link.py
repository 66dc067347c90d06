"""The link between a frontend process and the engine process: frames over a Unix socket.

A frame is a `trtserve.internal.Frame` protobuf (protos/trtserve/internal/link.proto)
behind a 4-byte little-endian length. Each side appends its messages to one
pending frame and writes it once, at the end of the event-loop iteration that
produced them (`Link.outgoing`), and parses every complete frame a read brings:
under load one write and one parse carry many requests, and the engine loop's
cost per request, which bounds the server's throughput, stays a few fields. A
frontend may hold a frame a little longer (`outgoing`'s `hold_s`) while the
engine reports a backlog (`Frame.backlogged`, stamped by `before_write`).

The socket is one end of a socketpair the engine made before starting the
frontend: no path, no listener, and either side's death is the other's EOF.

Control messages (rare: descriptions, stats snapshots, the server config) carry
engine/api.py's frozen dataclasses in `payload`, pickled between these two
processes of one build only, and unpickled with a list of the classes they may
hold (`decode_payload`), so a payload names no other code.
"""

from __future__ import annotations

import asyncio
import io
import logging
import pickle
from collections.abc import Callable
from typing import Any

from trtserve.service.gen.trtserve.internal import link_pb2

log = logging.getLogger(__name__)

Frame = link_pb2.Frame
HEADER_BYTES = 4
# A frame larger than this is a broken peer, not a message (inline tensors are small).
MAX_FRAME_BYTES = 1 << 30


class Link(asyncio.Protocol):
    """One end of the link, as an asyncio Protocol: frames in, frames out, coalesced."""

    def __init__(self, on_frame: Callable[[Any], None],
                 on_lost: Callable[[BaseException | None], None],
                 flush_on_read: bool = False,
                 on_read_end: Callable[[], None] | None = None,
                 before_write: Callable[[Any], None] | None = None) -> None:
        self._on_frame = on_frame
        # Called with each frame just before it is written (the engine stamps its state).
        self._before_write = before_write
        # Called once the frames of one read are parsed: a receiver that gathers the
        # frames' messages acts on them together there (the engine's groups).
        self._on_read_end = on_read_end
        # Write what the frames of a read produced at the read's end rather than at
        # the end of the loop iteration: at concurrency 1 that is one loop callback
        # fewer between a request's arrival and its answer (the engine's side).
        self._flush_on_read = flush_on_read
        self._on_lost = on_lost
        self._transport: Any = None
        self._buffer = bytearray()
        self._pending: Any = None
        # The timer that writes a held frame (outgoing's hold_s); None when not held.
        self._held: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.frames_out = 0
        self.frames_in = 0

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's (which is no asyncio.Transport subclass): write/close alike.
        self._transport = transport
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        end = len(buffer)
        while end - start >= HEADER_BYTES:
            size = int.from_bytes(buffer[start:start + HEADER_BYTES], "little")
            if size > MAX_FRAME_BYTES:
                log.error("link: frame of %d bytes announced; closing the link", size)
                self.close()
                return
            if end - start - HEADER_BYTES < size:
                break
            body = bytes(buffer[start + HEADER_BYTES:start + HEADER_BYTES + size])
            start += HEADER_BYTES + size
            self.frames_in += 1
            self._on_frame(Frame.FromString(body))
        if start:
            del buffer[:start]
            if self._on_read_end is not None:
                self._on_read_end()
        if self._flush_on_read and self._pending is not None:
            self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._transport = None
        self._on_lost(exc)

    # --- sending ---

    def outgoing(self, hold_s: float = 0.0) -> Any:
        """The frame to add messages to; it is written once this loop iteration ends
        (or sooner, by `flush`, where the caller knows nothing else will join it).

        `hold_s` > 0: the caller's message may wait that long for others to join it,
        so a new frame is written only then; a caller that passes 0 has it written at
        this iteration's end, held or not.
        """
        loop = self._loop
        assert loop is not None
        if self._pending is None:
            self._pending = Frame()
            if hold_s > 0:
                self._held = loop.call_later(hold_s, self.flush)
            else:
                loop.call_soon(self.flush)
        elif hold_s <= 0 and self._held is not None:
            self._held.cancel()
            self._held = None
            loop.call_soon(self.flush)
        return self._pending

    def flush(self) -> None:
        frame, self._pending = self._pending, None
        if self._held is not None:
            self._held.cancel()
            self._held = None
        if frame is None or self._transport is None or self._transport.is_closing():
            return
        if self._before_write is not None:
            self._before_write(frame)
        body = frame.SerializeToString()
        self.frames_out += 1
        self._transport.write(len(body).to_bytes(HEADER_BYTES, "little") + body)

    def close(self) -> None:
        if self._transport is not None:
            self.flush()
            self._transport.close()


async def open_link(sock: Any, on_frame: Callable[[Any], None],
                    on_lost: Callable[[BaseException | None], None],
                    flush_on_read: bool = False,
                    on_read_end: Callable[[], None] | None = None,
                    before_write: Callable[[Any], None] | None = None) -> Link:
    """Serve the link over a connected Unix socket (one end of a socketpair)."""
    loop = asyncio.get_running_loop()
    _, link = await loop.create_unix_connection(
        lambda: Link(on_frame, on_lost, flush_on_read, on_read_end, before_write), sock=sock)
    return link


# --- control payloads -------------------------------------------------------------------

_BUILTINS = frozenset({"tuple", "list", "dict", "set", "frozenset", "int", "float", "str",
                       "bytes", "bool", "complex", "slice", "range", "NoneType"})
_MODULES = ("trtserve.service.", "numpy", "collections", "datetime", "grpc")


class _Unpickler(pickle.Unpickler):
    """Only the classes a control payload may hold: trtserve's data, numpy, builtins."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if module == "copyreg" and name == "_reconstructor":
            return super().find_class(module, name)
        if (module.startswith(_MODULES) and not name.startswith("_")) or (
                module.startswith("numpy") and name in ("_reconstruct", "_frombuffer")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"link payload names {module}.{name}, which it may not")


def encode_payload(value: object) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def decode_payload(data: bytes) -> Any:
    return _Unpickler(io.BytesIO(data)).load()
