"""Our KServe v2 protos against tritonclient's: same wire contract, checked on
the real descriptors.

tritonclient ships its own generated copy of the same protos. Ours live in
trtserve's private descriptor pool (service/descriptors.py), so both import
into one process; the tritonclient side still runs in a child interpreter, so
this test also holds where an application imports tritonclient alone. The child
prints tritonclient's FileDescriptorProtos, which are compared here with the
descriptors our generated modules register.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor

from trtserve.client.gen.inference import grpc_service_pb2, model_config_pb2

_DUMP_TRITONCLIENT = """
import sys
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2
files = descriptor_pb2.FileDescriptorSet()
for module in (model_config_pb2, service_pb2):
    module.DESCRIPTOR.CopyToProto(files.file.add())
sys.stdout.buffer.write(files.SerializeToString())
"""

_Label = descriptor_pb2.FieldDescriptorProto.Label
_Type = descriptor_pb2.FieldDescriptorProto.Type
FileProto = descriptor_pb2.FileDescriptorProto
MessageProto = descriptor_pb2.DescriptorProto
EnumProto = descriptor_pb2.EnumDescriptorProto
FieldProto = descriptor_pb2.FieldDescriptorProto


@pytest.fixture(scope="module")
def theirs() -> list[FileProto]:
    out = subprocess.run([sys.executable, "-c", _DUMP_TRITONCLIENT], capture_output=True,
                         check=True, timeout=120).stdout
    files = descriptor_pb2.FileDescriptorSet.FromString(out)
    # Guard against comparing nothing: tritonclient's files must be there.
    assert {f.name for f in files.file} == {"model_config.proto", "grpc_service.proto"}
    return list(files.file)


def _as_proto(descriptor: FileDescriptor) -> FileProto:
    proto = FileProto()
    descriptor.CopyToProto(proto)
    return proto


@pytest.fixture(scope="module")
def ours() -> list[FileProto]:
    return [_as_proto(model_config_pb2.DESCRIPTOR), _as_proto(grpc_service_pb2.DESCRIPTOR)]


# ---------------------------------------------------------------------------
# The comparison: every message, enum and service of theirs must exist in ours
# with the same wire shape. Returns human-readable differences.
# ---------------------------------------------------------------------------


def _messages(
    prefix: str, messages: Iterable[MessageProto]
) -> Iterator[tuple[str, MessageProto]]:
    for message in messages:
        full = f"{prefix}.{message.name}"
        yield full, message
        yield from _messages(full, message.nested_type)


def _enums(files: list[FileProto]) -> dict[str, EnumProto]:
    found: dict[str, EnumProto] = {}
    for f in files:
        for enum in f.enum_type:
            found[f"{f.package}.{enum.name}"] = enum
        for full, message in _messages(f.package, f.message_type):
            for enum in message.enum_type:
                found[f"{full}.{enum.name}"] = enum
    return found


def _all_messages(
    files: list[FileProto],
) -> dict[str, MessageProto]:
    return {full: m for f in files for full, m in _messages(f.package, f.message_type)}


def _field_shape(message: MessageProto, field: FieldProto) -> dict:
    """What of a field matters on the wire and in the generated API."""
    oneof = (message.oneof_decl[field.oneof_index].name
             if field.HasField("oneof_index") else None)
    return {
        "name": field.name,
        "type": _Type.Name(field.type),
        "label": _Label.Name(field.label),
        # Fully qualified (".inference.ModelConfig") for message and enum fields.
        "type_name": field.type_name,
        "oneof": oneof,
        "proto3_optional": field.proto3_optional,
    }


def compare(
    theirs: list[FileProto],
    ours: list[FileProto],
) -> list[str]:
    problems: list[str] = []
    if {f.package for f in theirs} != {f.package for f in ours}:
        problems.append(f"packages differ: {sorted({f.package for f in theirs})} vs "
                        f"{sorted({f.package for f in ours})}")

    our_messages = _all_messages(ours)
    for full, their in _all_messages(theirs).items():
        mine = our_messages.get(full)
        if mine is None:
            problems.append(f"message {full} is missing")
            continue
        if their.options.map_entry != mine.options.map_entry:
            problems.append(f"{full}: map entry {their.options.map_entry} vs "
                            f"{mine.options.map_entry}")
        their_fields = {f.number: _field_shape(their, f) for f in their.field}
        my_fields = {f.number: _field_shape(mine, f) for f in mine.field}
        for number, shape in their_fields.items():
            if number not in my_fields:
                problems.append(f"{full}: field {shape['name']} = {number} is missing")
            elif my_fields[number] != shape:
                problems.append(f"{full}: field {number} is {my_fields[number]}, "
                                f"expected {shape}")
        # Fields only we have are not checked: unknown fields are skipped on the
        # wire, and an older tritonclient (pyproject allows >= 2.50) lacks
        # fields the protocol has since gained.

    our_enums = _enums(ours)
    for full, their_enum in _enums(theirs).items():
        mine_enum = our_enums.get(full)
        if mine_enum is None:
            problems.append(f"enum {full} is missing")
            continue
        their_values = {v.name: v.number for v in their_enum.value}
        my_values = {v.name: v.number for v in mine_enum.value}
        if their_values != my_values:
            problems.append(f"enum {full}: {my_values}, expected {their_values}")

    our_services = {f"{f.package}.{s.name}": s for f in ours for s in f.service}
    for f in theirs:
        for service in f.service:
            full = f"{f.package}.{service.name}"
            mine_service = our_services.get(full)
            if mine_service is None:
                problems.append(f"service {full} is missing")
                continue
            my_methods = {m.name: m for m in mine_service.method}
            for method in service.method:
                my_method = my_methods.get(method.name)
                if my_method is None:
                    problems.append(f"{full}.{method.name} is missing")
                    continue
                for attr in ("input_type", "output_type", "client_streaming",
                             "server_streaming"):
                    if getattr(method, attr) != getattr(my_method, attr):
                        problems.append(f"{full}.{method.name}: {attr} "
                                        f"{getattr(my_method, attr)!r}, expected "
                                        f"{getattr(method, attr)!r}")
    return problems


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------


def test_messages_enums_and_services_match_tritonclient(
    theirs: list[FileProto],
    ours: list[FileProto],
) -> None:
    problems = compare(theirs, ours)
    assert not problems, "wire contract differs from tritonclient's:\n" + "\n".join(problems)


def test_comparison_covers_the_published_service(
    theirs: list[FileProto],
) -> None:
    # The comparison above is only as strong as what it walks: make sure it
    # walks the whole service and the deep config tree, not an empty list.
    methods = {m.name for f in theirs for s in f.service for m in s.method}
    assert {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
            "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
            "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
            "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
            "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
            "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting",
            "LogSettings"} <= methods
    messages = _all_messages(theirs)
    assert "inference.ModelOptimizationPolicy.Cuda.GraphSpec.LowerBound.InputEntry" in messages
    assert "inference.ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind" in _enums(theirs)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        # A renumbered field, a retyped field, a changed label, a field moved
        # out of its oneof, a missing nested message, a renumbered enum value,
        # a method with the wrong streaming flag: each must be reported.
        (lambda files: _field(files, "ModelInferRequest", "raw_input_contents")
         .__setattr__("number", 8), "raw_input_contents = 7 is missing"),
        (lambda files: _field(files, "InferTensorContents", "fp32_contents")
         .__setattr__("type", _Type.TYPE_DOUBLE), "inference.InferTensorContents: field 6"),
        (lambda files: _field(files, "ModelStatistics", "batch_stats")
         .__setattr__("label", _Label.LABEL_OPTIONAL), "inference.ModelStatistics: field 7"),
        (lambda files: _field(files, "InferParameter", "uint64_param")
         .ClearField("oneof_index"), "inference.InferParameter: field 5"),
        (lambda files: _message(files, "ModelInferResponse").nested_type.pop(0),
         "message inference.ModelInferResponse.InferOutputTensor is missing"),
        (lambda files: _enum_value(files, "DataType", "TYPE_BF16").__setattr__("number", 15),
         "enum inference.DataType"),
        (lambda files: _method(files, "ModelStreamInfer").__setattr__("server_streaming", False),
         "ModelStreamInfer: server_streaming False"),
    ],
)
def test_comparison_detects_a_broken_contract(
    theirs: list[FileProto],
    ours: list[FileProto],
    mutate: Callable[[list[FileProto]], object],
    expected: str,
) -> None:
    broken = [FileProto.FromString(f.SerializeToString()) for f in ours]
    mutate(broken)
    problems = compare(theirs, broken)
    assert any(expected in p for p in problems), problems


def _message(files: list[FileProto], name: str) -> MessageProto:
    for f in files:
        for message in f.message_type:
            if message.name == name:
                return message
    raise KeyError(name)


def _field(
    files: list[FileProto], message: str, field: str
) -> FieldProto:
    for f in _message(files, message).field:
        if f.name == field:
            return f
    raise KeyError(field)


def _enum_value(
    files: list[FileProto], enum: str, value: str
) -> descriptor_pb2.EnumValueDescriptorProto:
    for f in files:
        for e in f.enum_type:
            for v in e.value:
                if e.name == enum and v.name == value:
                    return v
    raise KeyError(value)


def _method(
    files: list[FileProto], name: str
) -> descriptor_pb2.MethodDescriptorProto:
    for f in files:
        for service in f.service:
            for method in service.method:
                if method.name == name:
                    return method
    raise KeyError(name)
