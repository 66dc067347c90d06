"""One connection flooding the server with HTTP/2 frames keeps no other client out.

Each flood comes from a raw socket in the test's process, as fast as it can send, while
a real client that connects after it began makes 100 calls: every one must be answered,
correctly. What each flood exercises: HTTP/2 "rapid reset" (CVE-2023-44487; bounded by
`server.max_concurrent_streams` and gRPC's overload protection), a PING flood (gRPC's
too-many-pings GOAWAY), SETTINGS and WINDOW_UPDATE floods, and a header block that never
ends (CVE-2024-27316's shape). Two of them found faults, both fixed in session 22: with
no stream limit a rapid reset made other clients' calls fail CANCELLED, and with the
listener on gRPC's iomgr transport a PING or WINDOW_UPDATE flood held every new
connection's handshake (docs/reliability.md, "Connections").
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from benchmarks import h2_frames
from trtserve.client import Client
from trtserve.service.testing.servers import ServerProcess

# A finished handshake: HTTP/2's client preface and an empty SETTINGS frame.
PREFACE = h2_frames.CLIENT_START


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) \
        + struct.pack(">I", stream) + payload


def _literal(name: str, value: str) -> bytes:
    """An HPACK header field without indexing, no Huffman (names and values < 127 bytes)."""
    return bytes([0, len(name)]) + name.encode() + bytes([len(value)]) + value.encode()


INFER_HEADERS = b"".join(_literal(k, v) for k, v in (
    (":method", "POST"), (":scheme", "http"), (":path", "/trtserve.v1.InferenceService/Infer"),
    (":authority", "127.0.0.1"), ("content-type", "application/grpc"), ("te", "trailers")))
# Frame types (RFC 9113, section 6) the floods send.
HEADERS, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE, CONTINUATION = 1, 3, 4, 6, 8, 9
END_HEADERS, CANCEL = 0x4, 8


def _rapid_reset() -> Callable[[], bytes]:
    """Infer streams opened and reset at once (CVE-2023-44487), 100 a batch."""
    stream = 1

    def batch() -> bytes:
        nonlocal stream
        out = bytearray()
        for _ in range(100):
            out += _frame(HEADERS, END_HEADERS, stream, INFER_HEADERS)
            out += _frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL))
            stream += 2
        return bytes(out)
    return batch


def _endless_headers() -> Callable[[], bytes]:
    """One Infer stream whose header block never ends: CONTINUATION frames of 100-byte
    fields, 100 a batch (CVE-2024-27316's shape)."""
    opened = False

    def batch() -> bytes:
        nonlocal opened
        head = b"" if opened else _frame(HEADERS, 0, 1, INFER_HEADERS)
        opened = True
        return head + _frame(CONTINUATION, 0, 1, _literal("x-pad", "a" * 100)) * 100
    return batch


FLOODS: dict[str, Callable[[], Callable[[], bytes]]] = {
    "rapid reset": _rapid_reset,
    "endless headers": _endless_headers,
    "pings": lambda: lambda: _frame(PING, 0, 0, b"12345678") * 100,
    "settings": lambda: lambda: _frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 100)) * 100,
    "window updates": lambda: lambda: _frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 100,
}


def _flood(port: int, batches: Callable[[], bytes], stop: threading.Event,
           seen: h2_frames.Direction) -> None:
    """Send `batches()` on one connection until `stop` or the server closes it; `seen`
    counts the frames the server sends back (h2_frames' parser)."""
    parser = h2_frames.FrameParser(seen, preface=False)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(PREFACE)
        try:
            while not stop.is_set():
                s.sendall(batches())
                s.setblocking(False)
                try:
                    while chunk := s.recv(1 << 20):
                        parser.feed(chunk)
                    return  # closed by the server
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.mark.parametrize("kind", FLOODS)
def test_an_http2_flood_on_one_connection_fails_no_other_clients_call(
        example_onnx: Path, kind: str) -> None:
    """One connection floods the server with HTTP/2 frames as fast as it can: another
    client, connecting after the flood began, has its 100 calls all answered, correctly.

    - rapid reset: streams opened and reset at once. The server refuses those past
      `max_concurrent_streams` (1,024 by default) with RST_STREAM; with no limit (gRPC's
      default) such a connection filled the calls waiting for the loop and other
      clients' calls failed CANCELLED (docs/reliability.md, "Connections").
    - pings: the server answers GOAWAY (too many pings).
    - endless headers, settings, window updates: gRPC's core takes them (discarding a
      header block past its size limit); the loop never sees them.

    With the listener on gRPC's iomgr transport (before session 22), a flood of pings
    or window updates held the new client's handshake until the flood stopped (its
    call failed UNAVAILABLE, "timed out before receiving SETTINGS frame").
    """
    server = ServerProcess(["--model", f"example={example_onnx}"])
    x = np.random.default_rng(5).standard_normal((1, 64)).astype(np.float32)
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"input": x})
    stop, seen = threading.Event(), h2_frames.Direction()
    with server.serving(), Client(server.url) as client:
        flood = threading.Thread(target=_flood,
                                 args=(server.port, FLOODS[kind](), stop, seen))
        flood.start()
        try:
            time.sleep(0.5)
            for _ in range(100):
                got = client.infer("example", {"input": x}, timeout=30)["output"]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        finally:
            stop.set()
            flood.join(30)
    if kind == "rapid reset":
        # The server refused streams: the limit held.
        assert seen.frames["RST_STREAM"] >= 1000, seen.frames
    if kind == "pings":
        # Too many pings: GOAWAY (gRPC then closes the connection, or, in some runs, goes
        # on answering its pings; either way the other client was served).
        assert seen.frames["GOAWAY"], seen.frames
