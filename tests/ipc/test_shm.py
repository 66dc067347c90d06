"""Shared-memory arenas: ranges come and go in any order; bytes cross between mappings."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from trtserve.service.ipc.shm import ALIGN_BYTES, Arena, Ring


def test_ring_reuses_space_freed_out_of_order() -> None:
    ring = Ring(1024)
    a, b, c = ring.alloc(300), ring.alloc(300), ring.alloc(300)
    assert (a, b, c) == (0, 320, 640)
    assert ring.alloc(300) is None  # 960 used of 1024
    ring.free(b)  # not the oldest: nothing is reclaimed yet
    assert ring.alloc(300) is None
    ring.free(a)  # the oldest two go: the ring wraps into [0, 640)
    assert ring.alloc(600) == 0
    assert ring.alloc(64) is None  # head at 640 meets the tail (c at 640)
    ring.free(c)
    assert ring.used_bytes == 640


def test_ring_never_overlaps_live_ranges() -> None:
    ring = Ring(64 * 1024)
    rng = random.Random(7)
    live: dict[int, int] = {}
    for _ in range(20_000):
        if live and rng.random() < 0.5:
            offset = rng.choice(list(live))
            ring.free(offset)
            del live[offset]
            continue
        size = rng.randint(1, 9000)
        offset = ring.alloc(size)
        if offset is None:
            continue
        end = offset + -(-size // ALIGN_BYTES) * ALIGN_BYTES
        assert offset >= 0 and end <= ring.capacity
        for o, n in live.items():
            assert end <= o or offset >= o + n, "ranges overlap"
        live[offset] = end - offset
    for offset in list(live):
        ring.free(offset)
    assert ring.used_bytes == 0
    assert ring.alloc(64 * 1024) == 0  # everything reclaimed


def test_ring_refuses_more_than_its_capacity() -> None:
    assert Ring(1024).alloc(1025) is None


def test_arena_bytes_cross_to_a_second_mapping() -> None:
    writer = Arena.create("test", 1 << 20)
    reader = Arena(os.dup(writer.fd), 1 << 20)
    try:
        array = np.arange(1000, dtype=np.float32).reshape(10, 100)
        offset = writer.write(array)
        assert offset is not None
        view = reader.view(offset, array.nbytes, np.dtype(np.float32), (10, 100))
        np.testing.assert_array_equal(view, array)
        assert not view.flags.writeable  # the engine never writes into a frontend's bytes
        with pytest.raises(ValueError, match="outside the arena"):
            reader.view((1 << 20) - 8, 64, np.dtype(np.float32), (16,))
    finally:
        writer.close()
        reader.close()


def test_an_arena_pinned_for_tensorrt_hands_out_pinned_views_and_unpins_before_closing(
        caplog):
    from tests.doubles.cuda_ipc import RecordingPinner
    from trtserve.service.backends.base import PinnedHostArray

    arena = Arena.create("pin-test", 1 << 16)
    pinner = RecordingPinner()
    arena.pin(pinner)
    arena.pin(pinner)  # once only
    assert pinner.calls == ["register"] and list(pinner.pinned.values()) == [1 << 16]
    x = np.arange(8, dtype=np.float32)
    offset = arena.write(x)
    assert offset is not None
    view = arena.view(offset, x.nbytes, x.dtype, x.shape)
    assert isinstance(view, PinnedHostArray) and not view.flags.writeable
    np.testing.assert_array_equal(view, x)
    del view
    arena.close()
    assert pinner.calls == ["register", "unregister"] and pinner.pinned == {}

    refused = Arena.create("pin-refused", 1 << 16)
    refusing = RecordingPinner(refuse="cudaErrorNotSupported")
    refused.pin(refusing)
    refused.pin(refusing)
    offset = refused.write(x)
    assert offset is not None
    assert not isinstance(refused.view(offset, x.nbytes, x.dtype, x.shape), PinnedHostArray)
    assert [r.getMessage() for r in caplog.records if "cudaHostRegister" in r.getMessage()
            and "cudaErrorNotSupported" in r.getMessage()] != []
    assert refusing.calls == ["register"]
    refused.close()
    assert refusing.calls == ["register"]
