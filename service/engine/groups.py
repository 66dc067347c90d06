"""Requests the engine process reads together, queued together: groups.

Under load a read of a frontend's link brings several requests of the same
model with the same shapes (its clients' calls of one frontend loop pass, and
the frames that queued while the engine was busy). Each costs the engine's one
loop thread the same Python (validation, the byte budget, a batcher entry, its
settling, counting), and that loop thread is what bounds the server's
throughput with many frontends. So the host stacks such requests along the
batch dimension into one group, which the batcher queues as one request of
their rows and the model counts as that many requests; its outputs are cut
back into each member's rows for the replies.

What a member would get alone, it still gets:
- the same outputs (rows are independent along the batch dimension; a model
  that does not batch is never grouped);
- its own error where its input is at fault: a group is formed only of
  requests that pass validation together, and a batch the backend refuses runs
  member by member (`Worker._run_alone`), each with its own outcome;
- its own cancellation and deadline: a member given up is answered CANCELLED
  while the others go on; the group is cancelled once all its members are, and
  its deadline is the latest of theirs (the frontend enforces each member's).

Nothing waits to form a group: at concurrency 1 a read brings one request,
which goes on alone as before.

A frontend forms groups too, of the requests one of its frames carries
(`RemoteEngine`, service/engine/remote.py): it sends them as one `Request` with
`member_ids`, its inputs stacked, inline or in one arena range (`sent`). The
engine's loop thread bounds the server, and a frontend has cores to spare:
forming groups there takes the per-member work of `entry` and `stack` off that
thread (a third of its samples with 8-row requests, py-spy on
`benchmarks/engine_loop.py`'s `trt thread 8x32 rows8`). A sent group the model
refuses goes member by member (`members`), as a group formed here does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from trtserve.client.dtypes import DTYPES
from trtserve.service.engine.api import RegionRef
from trtserve.service.errors import InvalidArgument
from trtserve.service.gen.trtserve.internal import link_pb2
from trtserve.service.ipc import codec
from trtserve.service.ipc.shm import Arena

# Past this many input bytes a group's per-request Python saving is small beside its
# bytes (inline inputs are joined into one array, arena ones gathered by the
# executor), and its requests go on alone.
MAX_GROUP_BYTES = 4 << 20

Key = tuple[Any, ...]


def entry(message: Any, now_s: float) -> tuple[Key, int, int] | None:
    """What requests must share to be stacked (model, version, outputs asked, and each
    input's name, dtype, where its bytes lie and its shape past the batch dimension),
    the request's rows and its input bytes; None: never grouped (a client region, in
    or out; a BYTES tensor, whose elements have no fixed size; inputs that disagree
    on rows, which validation tells it alone; past its deadline at `now_s`, which the
    batcher drops; a group a frontend sent, which goes as it came). One pass over the
    message: this runs for every request of a read of several, in the engine's loop."""
    if message.member_ids or message.output_regions or (
            message.HasField("deadline") and message.deadline <= now_s):
        return None
    key: list[Any] = [message.model, message.version, *message.outputs, None]
    rows = -1
    nbytes = 0
    for t in message.inputs:
        which = t.WhichOneof("data")
        if which == "inline":
            nbytes += len(t.inline)
        elif which == "arena":
            nbytes += t.arena.byte_size
        else:
            return None
        shape = t.shape[:]
        dtype = t.dtype
        if not shape or dtype == "BYTES":
            return None
        if rows < 0:
            rows = shape[0]
        elif shape[0] != rows:
            return None
        shape[0] = which
        key += (t.name, dtype, *shape)
    if rows < 0:
        return None
    return tuple(key), rows, nbytes


def stack(messages: Sequence[Any], rows: Sequence[int], arena: Arena | None
          ) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, list[np.ndarray]]]:
    """The members' inputs stacked along dimension 0, each input's dtype, and the
    inputs left in the arena (`Request.parts`). `messages` share a key (`entry`), so
    their inputs come in the same order, of the same dtypes and trailing shapes,
    inline or in the arena alike.

    Inline inputs are joined into one array (one copy of a few KiB per member). Arena
    inputs stay where their members' frontend wrote them: the group's array for
    those only describes them (`described`), and the executor's gathering into its
    buffer is their one copy. Copying them here too took a fifth of the engine loop's
    samples in py-spy with 8-row requests (16 KiB each; `engine_loop`'s `rows8
    full`); its loop time per request fell 33.5 -> 31.0 us without the copy."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    parts: dict[str, list[np.ndarray]] = {}
    total = sum(rows)
    for i, t in enumerate(messages[0].inputs):
        dtype = DTYPES.get(t.dtype)
        if dtype is None:
            raise InvalidArgument(f"tensor '{t.name}': unknown dtype {t.dtype!r}")
        shape = (total, *t.shape[1:])
        if t.WhichOneof("data") == "inline":
            inline = [m.inputs[i].inline for m in messages]
            row_bytes = dtype.itemsize * math.prod(shape[1:])
            # Each member's bytes are its own rows' (a frontend's broken message must not
            # move rows from one member to another): else each goes alone, to fail alone.
            for data, n in zip(inline, rows, strict=True):
                if len(data) != n * row_bytes:
                    raise InvalidArgument(f"tensor '{t.name}': {len(data)} bytes for {n} rows")
            arrays[t.name] = np.frombuffer(b"".join(inline), dtype=dtype).reshape(shape)
        else:
            views = []
            for m in messages:
                _, _, view = codec.take(m.inputs[i], arena, copy=False)
                assert not isinstance(view, RegionRef)  # entry keeps regions out
                views.append(view)
            arrays[t.name] = described(dtype, shape)
            parts[t.name] = views
        dtypes[t.name] = t.dtype
    return arrays, dtypes, parts


@functools.lru_cache(maxsize=256)
def described(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """An array of this dtype and shape that holds no data of its own (every element
    one shared zero): what validation and the byte budget read of a group's input
    whose rows stay in its members' parts. Read-only, so nothing can write through it
    and one can serve every group of its shape (kept: groups repeat a few shapes)."""
    return np.broadcast_to(np.zeros((), dtype), shape)


def latest(deadlines: Sequence[float | None]) -> float | None:
    """A group's deadline: the latest of its members'; None if any has none (it may
    wait on)."""
    if None in deadlines:
        return None
    return max(d for d in deadlines if d is not None)


def sent_deadlines(message: Any) -> list[float | None]:
    """Each member's deadline of a group a frontend sent (0 on the wire: none)."""
    deadlines = message.member_deadlines
    if not deadlines:
        return [None] * len(message.member_ids)
    if len(deadlines) != len(message.member_ids):
        raise InvalidArgument(f"a group of {len(message.member_ids)} members with "
                              f"{len(deadlines)} deadlines")
    return [d or None for d in deadlines]


def member_rows(message: Any) -> list[int]:
    """Each member's rows of a group a frontend sent; InvalidArgument where the counts
    disagree with the members."""
    ids, rows = message.member_ids, message.member_rows
    if len(rows) != len(ids):
        raise InvalidArgument(f"a group of {len(ids)} members with {len(rows)} row counts")
    return list(rows)


def sent(message: Any, rows: Sequence[int], arena: Arena | None
         ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The inputs of a group a frontend sent (`Request.member_ids`, its `member_rows`
    in `rows`): each the members' rows stacked, read in one piece (inline, or a view of
    one arena range), and each input's dtype. Every input must hold exactly the
    members' rows, so that each member's rows are where its reply is cut from."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    total = sum(rows)
    for t in message.inputs:
        if t.WhichOneof("data") == "region":
            raise InvalidArgument(f"tensor '{t.name}': a group's input is inline or in the "
                                  "arena")
        dtype, shape, data = codec.take(t, arena, copy=False)  # ValueError: bytes != shape
        if not shape or shape[0] != total:
            raise InvalidArgument(f"tensor '{t.name}': shape {list(shape)} for a group of "
                                  f"{total} rows")
        assert isinstance(data, np.ndarray)
        arrays[t.name] = data
        dtypes[t.name] = dtype
    return arrays, dtypes


def members(message: Any) -> list[Any]:
    """A group a frontend sent, as its members' own requests (each with its own rows of
    every input: a slice of the inline bytes or of the arena range), to run and fail
    alone. Raises InvalidArgument where the group cannot be cut (its counts disagree,
    or an input does not hold exactly the members' rows): a broken frontend."""
    ids, rows = message.member_ids, member_rows(message)
    deadlines = sent_deadlines(message)
    starts = [0]
    for n in rows:
        starts.append(starts[-1] + n)
    out = [link_pb2.Request(id=rid, model=message.model, version=message.version,
                            outputs=message.outputs) for rid in ids]
    for m, deadline in zip(out, deadlines, strict=True):
        if deadline is not None:
            m.deadline = deadline
    for t in message.inputs:
        which = t.WhichOneof("data")
        size = len(t.inline) if which == "inline" else t.arena.byte_size \
            if which == "arena" else -1
        dtype = DTYPES.get(t.dtype)
        row_bytes = dtype.itemsize * math.prod(t.shape[1:]) if dtype is not None else -1
        if size < 0 or row_bytes < 0 or size != starts[-1] * row_bytes:
            raise InvalidArgument(f"tensor '{t.name}': {size} bytes of {t.dtype} for a "
                                  f"group of {starts[-1]} rows of {list(t.shape[1:])}")
        for i, m in enumerate(out):
            one = m.inputs.add(name=t.name, dtype=t.dtype, shape=[rows[i], *t.shape[1:]])
            begin, end = starts[i] * row_bytes, starts[i + 1] * row_bytes
            if which == "inline":
                one.inline = t.inline[begin:end]
            else:
                one.arena.offset = t.arena.offset + begin
                one.arena.byte_size = end - begin
    return out
