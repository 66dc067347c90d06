"""trtserve's own protobuf descriptor pool.

The generated modules (client/gen, service/gen) register their types here instead of
in protobuf's process-wide default pool (the Makefile points their
`descriptor_pool` import at this module). Triton's client ships its own
generated copy of the `inference.*` KServe types; with one shared pool, the
second of the two to be imported fails with "duplicate symbol". A private pool
lets an application (or a test) use tritonclient and trtserve side by side.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor

_POOL = descriptor_pool.DescriptorPool()


def Default() -> descriptor_pool.DescriptorPool:
    return _POOL


def include(*files: FileDescriptor) -> descriptor_pool.DescriptorPool:
    """Add other packages' files (health, reflection) so reflection can describe them too."""
    for file in files:
        try:
            _POOL.FindFileByName(file.name)
        except KeyError:
            _POOL.AddSerializedFile(file.serialized_pb)
    return _POOL


def include_renamed(file: FileDescriptor, package: str, renamed: str, name: str) -> None:
    """Add `file` again as package `renamed` (file `name`): for a protocol published under
    two package names with the same messages (grpc.reflection v1alpha and v1)."""
    try:
        _POOL.FindFileByName(name)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb)
    proto.name, proto.package = name, renamed
    old, new = f".{package}.", f".{renamed}."
    for message in proto.message_type:
        _rename_fields(message, old, new)
    for service in proto.service:
        for method in service.method:
            method.input_type = method.input_type.replace(old, new, 1)
            method.output_type = method.output_type.replace(old, new, 1)
    _POOL.Add(proto)


def _rename_fields(message: descriptor_pb2.DescriptorProto, old: str, new: str) -> None:
    for field in message.field:
        if field.type_name.startswith(old):
            field.type_name = new + field.type_name[len(old):]
    for nested in message.nested_type:
        _rename_fields(nested, old, new)
