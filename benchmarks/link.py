"""Inline bytes or the shared-memory arena: where does a tensor cross the link faster?

    .venv/bin/python -m benchmarks.link

Two `Link`s over a socketpair on one event loop; each round trip sends a
request of one tensor of N bytes (inline, or written into an arena and named
by its range) and reads it on the other side as the engine does (a view for
the arena, `frombuffer` for inline), then answers with an empty reply that
frees the range. Windows of WINDOW requests are in flight at once, as under
load. Prints microseconds per request for each size and way; the smallest size
at which the arena wins sets `trtserve.service.ipc.codec.INLINE_MAX_BYTES`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time

import numpy as np

from trtserve.service.ipc import codec
from trtserve.service.ipc.link import open_link
from trtserve.service.ipc.shm import Arena

SIZES = (1 << 10, 4 << 10, 16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 1 << 20)
WINDOW = 32


async def measure(nbytes: int, use_arena: bool, requests: int) -> float:
    a, b = socket.socketpair()
    arena = Arena.create("bench", 256 << 20)
    array = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    answered = 0
    sent = 0

    def engine_frame(frame: object) -> None:
        for request in frame.requests:  # type: ignore[attr-defined]
            for t in request.inputs:
                _, _, data = codec.take(t, arena, copy=False)
                assert isinstance(data, np.ndarray)
                float(data[0])
            reply = engine.outgoing().replies.add()
            reply.id = request.id

    def frontend_frame(frame: object) -> None:
        nonlocal answered
        for reply in frame.replies:  # type: ignore[attr-defined]
            if offsets.get(reply.id) is not None:
                arena.free(offsets.pop(reply.id))
            answered += 1
            send_one()
        if answered == requests and not done.done():
            done.set_result(None)

    offsets: dict[int, int | None] = {}

    def send_one() -> None:
        nonlocal sent
        if sent == requests:
            return
        sent += 1
        request = frontend.outgoing().requests.add()
        request.id = sent
        offsets[sent] = codec.put(request.inputs.add(), "x", "FP32", array.shape, array,
                                  arena if use_arena else None, inline_max_bytes=0)

    engine = await open_link(a, engine_frame, lambda e: None)
    frontend = await open_link(b, frontend_frame, lambda e: None)
    start = time.perf_counter()
    for _ in range(WINDOW):
        send_one()
    await done
    elapsed = time.perf_counter() - start
    engine.close()
    frontend.close()
    arena.close()
    return elapsed / requests * 1e6


async def main_async(requests: int) -> None:
    print(f"{'bytes':>9} {'inline us':>10} {'arena us':>9}")
    for nbytes in SIZES:
        n = max(200, requests * 4096 // max(nbytes, 4096))
        inline = min([await measure(nbytes, False, n) for _ in range(3)])
        arena = min([await measure(nbytes, True, n) for _ in range(3)])
        print(f"{nbytes:>9} {inline:>10.1f} {arena:>9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--requests", type=int, default=4000)
    asyncio.run(main_async(p.parse_args().requests))


if __name__ == "__main__":
    main()
