"""A loopback TCP proxy that counts the HTTP/2 frames crossing it, each way.

    proxy = FrameProxy("127.0.0.1:8001")   # the server
    proxy.start()                           # listens on proxy.url
    ... point a gRPC client at proxy.url, send N requests ...
    proxy.stop(); proxy.counts["server"]    # what the server sent

It forwards bytes untouched and reads only the 9-byte frame headers (RFC 9113
section 4.1: 24-bit length, type, flags, 31-bit stream id), so it sees what
each side put on the wire: how many frames of each type, their payload bytes,
and how many separate reads the bytes arrived in. A read is at least one
write by the sender, each of which the receiver's gRPC wakes up for; a
server that writes a response's HEADERS, DATA and trailers in one go costs
its client one wakeup, one that writes them apart costs it three.

The proxy costs CPU of its own and shifts timing, so measure CPU without it
and frames with it, at the same load.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field

FRAME_TYPES = {0: "DATA", 1: "HEADERS", 2: "PRIORITY", 3: "RST_STREAM", 4: "SETTINGS",
               5: "PUSH_PROMISE", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE",
               9: "CONTINUATION"}
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client's connection preface, before frames
# The preface and an empty SETTINGS frame: all a client must send to finish the handshake.
CLIENT_START = PREFACE + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
HEADER_BYTES = 9
KEEP_HEADER_BLOCKS = 16
CONTROL = {"WINDOW_UPDATE", "PING", "SETTINGS"}


@dataclass
class Direction:
    """What one side sent: frames by type, their payload bytes, and reads it came in."""

    frames: Counter[str] = field(default_factory=Counter)
    payload_bytes: Counter[str] = field(default_factory=Counter)
    # HEADERS frames that end their stream (trailers) and those that do not
    # (response or request headers), with their HPACK-encoded sizes.
    trailers: int = 0
    trailer_bytes: int = 0
    reads: int = 0
    # Reads in which every frame that began was WINDOW_UPDATE, PING or SETTINGS: wakeups
    # the receiver spends on flow control alone.
    control_reads: int = 0
    # Writes the proxy made to the receiver: the reads when it forwards as it reads,
    # fewer when it holds the bytes (coalesce_s).
    delivered: int = 0
    wire_bytes: int = 0
    # The first HEADERS frames' HPACK blocks (maybe cut short by a read), to decode by hand.
    header_blocks: list[bytes] = field(default_factory=list)

    def clear(self) -> None:
        self.frames.clear()
        self.payload_bytes.clear()
        self.trailers = self.trailer_bytes = self.reads = self.wire_bytes = 0
        self.control_reads = self.delivered = 0
        self.header_blocks.clear()


def copy_direction(d: Direction) -> Direction:
    return Direction(Counter(d.frames), Counter(d.payload_bytes), d.trailers, d.trailer_bytes,
                     d.reads, d.control_reads, d.delivered, d.wire_bytes,
                     list(d.header_blocks))


class FrameParser:
    """Splits one direction's byte stream into frames, however the reads cut it."""

    def __init__(self, into: Direction, preface: bool) -> None:
        self.into = into
        self._skip = len(PREFACE) if preface else 0
        self._buffer = b""
        self._body_left = 0  # payload bytes of the current frame still to pass

    def feed(self, data: bytes) -> None:
        self.into.reads += 1
        self.into.wire_bytes += len(data)
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        buffer = self._buffer + data
        i = 0
        began: set[str] = set()
        while True:
            if self._body_left:
                step = min(self._body_left, len(buffer) - i)
                self._body_left -= step
                i += step
                if self._body_left:
                    break
            if len(buffer) - i < HEADER_BYTES:
                break
            high, low, kind, flags = struct.unpack_from(">BHBB", buffer, i)
            length = (high << 16) | low
            name = FRAME_TYPES.get(kind, f"type {kind}")
            began.add(name)
            self.into.frames[name] += 1
            self.into.payload_bytes[name] += length
            if name == "HEADERS" and flags & 0x1:  # END_STREAM: the trailers
                self.into.trailers += 1
                self.into.trailer_bytes += length
            if name == "HEADERS" and len(self.into.header_blocks) < KEEP_HEADER_BLOCKS:
                start = i + HEADER_BYTES
                self.into.header_blocks.append(buffer[start:start + length])
            i += HEADER_BYTES
            self._body_left = length
        self._buffer = buffer[i:]
        if began and began <= CONTROL:
            self.into.control_reads += 1


class FrameProxy:
    """Forwards one port to `target`, counting frames; runs its own loop in a thread."""

    def __init__(self, target: str, coalesce_s: float = 0.0) -> None:
        host, port = target.rsplit(":", 1)
        # > 0: hold what the server sends this long and forward it in one write, as a
        # server that answers a batch's requests together would (the experiment that
        # shows what the client's CPU per request owes to the server's write pattern).
        self._coalesce_s = coalesce_s
        self._target = (host, int(port))
        self.counts = {"client": Direction(), "server": Direction()}
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="frame-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(10)
        self.url = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def reset(self) -> None:
        """Zero the counts (after a warm-up); the parsers keep their place in the stream."""
        async def zero() -> None:
            for d in self.counts.values():
                d.clear()
        asyncio.run_coroutine_threadsafe(zero(), self._loop).result(10)

    def snapshot(self) -> dict[str, Direction]:
        async def copy() -> dict[str, Direction]:
            return {k: copy_direction(d) for k, d in self.counts.items()}
        return asyncio.run_coroutine_threadsafe(copy(), self._loop).result(10)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _accept(self, client_r: asyncio.StreamReader,
                      client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:  # the server has gone (stopped after a run): the client sees it close
            client_w.close()
            return
        for sock in (client_w, server_w):
            raw = sock.get_extra_info("socket")
            if raw is not None:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = FrameParser(self.counts["client"], preface=True)
        down = FrameParser(self.counts["server"], preface=False)
        pipes = [asyncio.create_task(self._pipe(client_r, server_w, up, 0.0)),
                 asyncio.create_task(self._pipe(server_r, client_w, down, self._coalesce_s))]
        self._tasks.update(pipes)
        await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        for p in pipes:
            p.cancel()
            self._tasks.discard(p)
        for w in (client_w, server_w):
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    parser: FrameParser, coalesce_s: float) -> None:
        held: list[bytes] = []

        def flush() -> None:
            writer.write(b"".join(held))
            held.clear()
            parser.into.delivered += 1

        while data := await reader.read(1 << 20):
            parser.feed(data)
            if coalesce_s <= 0:
                writer.write(data)
                parser.into.delivered += 1
                await writer.drain()
                continue
            if not held:
                self._loop.call_later(coalesce_s, flush)
            held.append(data)
