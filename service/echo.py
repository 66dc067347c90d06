"""Client-supplied strings and lists, shortened before an error message repeats them.

A status message travels in the grpc-message trailer, which gRPC caps (about
16 KB): a message that repeats a 20 KB model name or 200,000 dimensions in
full is dropped by the client's transport, which then reports
RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" in place of the
real answer. Every error message that repeats something a client sent passes
it through here, so its size is bounded whatever the request held.
"""

from __future__ import annotations

from collections.abc import Sequence

# Characters of a client string kept in a message: enough to recognise any
# real model, tensor or datatype name; non-ASCII characters travel
# percent-encoded, up to 12 bytes each, so the worst case stays near 1.5 KB.
ECHO_CHARS = 96
# Dimensions of a client shape kept in a message (real tensors have a handful).
ECHO_DIMS = 8


def text(value: str) -> str:
    """`value`, or its first ECHO_CHARS characters, an ellipsis and its length."""
    if len(value) <= ECHO_CHARS:
        return value
    return f"{value[:ECHO_CHARS]}... ({len(value)} characters)"


def dims(shape: Sequence[int]) -> str:
    """`shape` as a list, or its first ECHO_DIMS dimensions, an ellipsis and the count."""
    if len(shape) <= ECHO_DIMS:
        return str(list(shape))
    shown = ", ".join(str(d) for d in shape[:ECHO_DIMS])
    return f"[{shown}, ...] ({len(shape)} dimensions)"
