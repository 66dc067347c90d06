"""trtserve's own protobuf descriptor pool.

The generated modules under service/gen register their types here instead of
in protobuf's process-wide default pool (the Makefile points their
`descriptor_pool` import at this module). Triton's client ships its own
generated copy of the `inference.*` KServe types; with one shared pool, the
second of the two to be imported fails with "duplicate symbol". A private pool
lets an application (or a test) use tritonclient and trtserve side by side.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool
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
