"""Count the fields of an encoded protobuf message, stopping early, without parsing it.

grpc parses a request on the event loop before any handler can look at it, and
parsing costs time and memory per field (what a flood of empty tensors cost:
docs/reliability.md, "A message of more than 16,384 fields"). Walking the
encoding in Python is far slower per field than parsing, but it can stop:
`exceeds` steps over at most `limit` + 1 fields, so deciding that a message
holds too many costs a bounded few milliseconds whatever its size.

The walk descends into the fields the message's descriptor declares as
messages (tensors, map entries, typed contents) and steps over everything
else in one move: a bytes field or a packed array of numbers counts once,
whatever its length, except a shape (a repeated integer field named `shape`),
whose dimensions count as fields, as each one parses into an int64 of its own
(one-byte dimensions take eight times their bytes). A packed varint takes 1 to
10 bytes, so a shape of n bytes counts as at least n / 10 dimensions, read in
one move.

Anything the walk cannot follow (a truncated field, a group, a wire type that
does not fit) ends it with "not too many", so that the real parser decides;
it never accepts what the parser would refuse.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

# Deeper than any request message of ours nests; recursion of types ends here.
_MAX_DEPTH = 32
# A plan's mark for a shape: its length in bytes / 10 is a count of dimensions.
_DIMS = "dims"
# Per message type: field number -> the field's message type, _DIMS, or None (other).
_Plan = dict[int, "Descriptor | str | None"]
_plans: dict[str, _Plan] = {}
_INTEGERS = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
             FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64}


def _kind(field: FieldDescriptor) -> Descriptor | str | None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return field.message_type
    if field.name == "shape" and field.type in _INTEGERS and field.is_repeated:
        return _DIMS
    return None


def _plan(descriptor: Descriptor) -> _Plan:
    plan = _plans.get(descriptor.full_name)
    if plan is None:
        plan = {f.number: _kind(f) for f in descriptor.fields}
        _plans[descriptor.full_name] = plan
    return plan


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it); value -1 where the bytes end first or it runs over 10."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def exceeds(data: bytes, descriptor: Descriptor, limit: int) -> bool:
    """Whether `data`, an encoded `descriptor` message, holds more than `limit` fields.

    Every field counts, at any depth; each element of a repeated field is a
    field; a packed array counts once.
    """
    count = 0
    # (end of the enclosing message, its plan), innermost last.
    stack: list[tuple[int, _Plan]] = []
    plan, pos, end = _plan(descriptor), 0, len(data)
    while True:
        while pos >= end:
            if pos > end or not stack:
                return False
            end, plan = stack.pop()
        tag, pos = _varint(data, pos, end)
        if tag <= 0:
            return False
        count += 1
        if count > limit:
            return True
        wire_type = tag & 7
        if wire_type == 0:
            value, pos = _varint(data, pos, end)
            if value < 0:
                return False
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _varint(data, pos, end)
            if length < 0 or pos + length > end:
                return False
            inner = plan.get(tag >> 3)
            if inner is None:
                pos += length
            elif isinstance(inner, str):  # _DIMS, packed: at least one per 10 bytes
                count += length // 10
                if count > limit:
                    return True
                pos += length
            elif len(stack) < _MAX_DEPTH:
                stack.append((end, plan))
                plan, end = _plan(inner), pos + length
            else:
                return False
        else:  # groups (3, 4) are not in our messages; 6 and 7 do not exist
            return False
