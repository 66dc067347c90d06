"""KServe v2 over HTTP (the Open Inference Protocol's REST form) <-> engine data.

Pure conversion, no server logic, beside kserve_convert (the same protocol's
protobuf messages): the HTTP frontend parses an inference request body here,
hands the tensors to the engine, and encodes the result here.

A body is a JSON object, optionally followed by binary tensor data (Triton's
binary-tensor extension, which tritonclient.http uses by default): the
request header `Inference-Header-Content-Length` says how many bytes of the
body are JSON; the rest holds, in input order, the bytes of every input whose
`parameters.binary_data_size` is set. Other inputs carry their elements in
`data` (a flat or nested row-major list). Outputs come back as binary when
their `parameters.binary_data` is true, or (when they do not say) when the
request's `parameters.binary_data_output` is; otherwise as JSON `data`.

Shared memory (Triton's system and CUDA shared-memory extensions): an input or
requested output whose `parameters` name `shared_memory_region` (with
`shared_memory_byte_size`, optionally `shared_memory_offset`) is read from or
written to that registered region, by the gRPC converter's rules
(kserve_convert.shared_memory_ref); such an output comes back described, with
no data, as Triton answers.

The rules are those of the gRPC form: the same datatypes (`trtserve.service.tensors`),
the same refusal of sequence batching and classification, the
same `timeout` parameter (microseconds before the request must have run), the
same messages naming the tensor. BF16 and FP16 have no JSON number form in the
gRPC protocol; here FP16 travels as JSON numbers, BF16 only as binary data.

Metadata, configuration and statistics are the protobuf messages of
kserve_model_config written as JSON (`message_json`), with Triton's field
names and numbers as numbers, so clients that read Triton's JSON read ours.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import Message

from trtserve.client.dtypes import DTYPES, encode
from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.service import echo
from trtserve.service.engine.api import InferResult, RegionRef, TensorIn
from trtserve.service.errors import InvalidArgument, TensorError
from trtserve.service.frontends.common import WireTensor
from trtserve.service.frontends.kserve_convert import KSERVE_DATATYPES, shared_memory_ref
from trtserve.service.tensors import decode, shaped

# Request header: bytes of the body that are JSON (the rest is binary tensor data).
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"

_SEQUENCE_KEYS = ("sequence_id", "sequence_start", "sequence_end")
_TIMEOUT_KEY = "timeout"
_BINARY_OUTPUT_KEY = "binary_data_output"
_BINARY_DATA_KEY = "binary_data"
_BINARY_SIZE_KEY = "binary_data_size"
_SHARED_MEMORY_KEY = "shared_memory_region"
_SHARED_MEMORY_KEYS = (_SHARED_MEMORY_KEY, "shared_memory_offset", "shared_memory_byte_size")
_CLASSIFICATION_KEY = "classification"

# numpy kinds a JSON list may hold for each family of datatypes.
_INT_KINDS = "iu"
_FLOAT_KINDS = "iuf"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    # None: as the request's `binary_data_output` says.
    binary: bool | None
    # Set: written into this registered region, answered without data.
    region: RegionRef | None = None


@dataclass(frozen=True)
class JsonInferRequest:
    """An inference request read from an HTTP body, checked as far as the body alone allows."""

    id: str
    inputs: Mapping[str, TensorIn]
    # Empty: every output, as `binary_default` says.
    outputs: tuple[RequestedOutput, ...]
    binary_default: bool
    # Microseconds the request may wait before it must have run; 0: none.
    timeout_us: int


@dataclass(frozen=True)
class _InputHeader:
    """One input of the JSON header, before its data is decoded (common.WireTensor)."""

    name: str
    shape: tuple[int, ...]
    datatype: str
    binary_size: int | None
    data: Any
    region: RegionRef | None = None


def header_length(value: str | None, body_bytes: int) -> int | None:
    """The JSON part's length from the `Inference-Header-Content-Length` header (None: all)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidArgument(f"header {HEADER_LENGTH}: expected a byte count, got "
                              f"{echo.text(value)!r}") from None
    if not 0 <= length <= body_bytes:
        raise InvalidArgument(f"header {HEADER_LENGTH}: {length} is not within the body's "
                              f"{body_bytes} bytes")
    return length


def parse_json(data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None
    except ValueError:
        # Python refuses integers of more digits than sys.get_int_max_str_digits().
        raise InvalidArgument(f"{what} holds an integer of more than "
                              f"{sys.get_int_max_str_digits()} digits") from None
    except RecursionError:
        raise InvalidArgument(f"{what} nests too deeply") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    return _object(holder.get("parameters", {}), f"{what} 'parameters'")


def _is_set(value: Any) -> bool:
    return value not in (None, False, 0, "")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_infer(body: bytes, json_length: int | None,
                check: Callable[[Sequence[WireTensor]], None] | None = None) -> JsonInferRequest:
    """Read an inference request body; every client mistake raises an InvalidArgument.

    `check` sees the inputs' names and shapes before any data is decoded (the
    frontend passes common.check_inputs for the model, so a request with
    unknown or repeated inputs is refused before its data costs anything).
    """
    view = memoryview(body)
    end = len(body) if json_length is None else json_length
    request = _object(parse_json(view[:end], "the request body"), "the request body")
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument("request 'id' must be a string")
    params = _parameters(request, "the request's")
    for key in _SEQUENCE_KEYS:
        if _is_set(params.get(key)):
            raise InvalidArgument(f"request parameter '{key}': sequence batching is not "
                                  "supported by trtserve")
    timeout = params.get(_TIMEOUT_KEY, 0)
    if not _int(timeout) or timeout < 0:
        raise InvalidArgument("request parameter 'timeout' must be a non-negative integer "
                              "(microseconds)")
    binary_default = params.get(_BINARY_OUTPUT_KEY, False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument(f"request parameter '{_BINARY_OUTPUT_KEY}' must be true or false")
    headers = _input_headers(request.get("inputs"))
    if check is not None:
        check(headers)
    inputs = _decode_inputs(headers, view[end:])
    outputs = _requested_outputs(request.get("outputs", []))
    return JsonInferRequest(id=request_id, inputs=inputs, outputs=outputs,
                            binary_default=binary_default, timeout_us=timeout)


def _input_headers(inputs: Any) -> list[_InputHeader]:
    if not isinstance(inputs, list):
        raise InvalidArgument("request 'inputs' must be a list of tensors")
    headers = []
    for index, tensor in enumerate(inputs):
        tensor = _object(tensor, f"input #{index}")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise TensorError("", f"input #{index} has no 'name'")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(_int(d) for d in shape):
            raise TensorError(name, "'shape' must be a list of integers")
        if any(d < 0 for d in shape):
            raise TensorError(name, f"shape {echo.dims(shape)} has a negative dimension; a "
                              "request gives concrete sizes")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in DTYPES:
            raise TensorError(name, _datatype_problem(datatype))
        params = _parameters(tensor, f"input '{echo.text(name)}'")
        region = _region(name, params)
        size = params.get(_BINARY_SIZE_KEY)
        if region is not None:
            if size is not None or "data" in tensor:
                raise TensorError(name, f"has '{_SHARED_MEMORY_KEY}' and also 'data' or "
                                  f"'{_BINARY_SIZE_KEY}'; send one")
            headers.append(_InputHeader(name, tuple(shape), datatype, None, None, region))
            continue
        if size is not None and (not _int(size) or size < 0):
            raise TensorError(name, f"parameter '{_BINARY_SIZE_KEY}' must be a non-negative "
                              "integer")
        if size is None and "data" not in tensor:
            raise TensorError(name, f"has no 'data' and no '{_BINARY_SIZE_KEY}' parameter")
        if size is not None and "data" in tensor:
            raise TensorError(name, f"has both 'data' and '{_BINARY_SIZE_KEY}'; send one")
        headers.append(_InputHeader(name, tuple(shape), datatype, size, tensor.get("data")))
    return headers


def _decode_inputs(headers: list[_InputHeader], binary: memoryview) -> dict[str, TensorIn]:
    needed = sum(h.binary_size for h in headers if h.binary_size is not None)
    if needed != len(binary):
        raise InvalidArgument(
            f"the inputs' {_BINARY_SIZE_KEY} parameters add up to {needed} bytes, but the body "
            f"has {len(binary)} bytes after its JSON header ({HEADER_LENGTH})")
    inputs: dict[str, TensorIn] = {}
    offset = 0
    for h in headers:
        if h.name in inputs:
            raise TensorError(h.name, "appears more than once in the request's inputs")
        if h.region is not None:
            inputs[h.name] = TensorIn(dtype=h.datatype, shape=h.shape, data=h.region)
            continue
        if h.binary_size is not None:
            array = decode(h.name, h.datatype, h.shape,
                           binary[offset:offset + h.binary_size])  # type: ignore[arg-type]
            offset += h.binary_size
        else:
            array = _from_json(h)
        inputs[h.name] = TensorIn(dtype=h.datatype, shape=h.shape, data=array)
    return inputs


def _from_json(h: _InputHeader) -> np.ndarray:
    """A tensor's JSON `data` (flat or nested, row-major) as an array of its datatype."""
    name, datatype = h.name, h.datatype
    if datatype == "BF16":
        raise TensorError(name, "BF16 data can only be sent as binary data "
                          f"(parameter '{_BINARY_SIZE_KEY}')")
    if not isinstance(h.data, list):
        raise TensorError(name, "'data' must be a list")
    count = math.prod(h.shape)
    np_dtype = DTYPES[datatype]
    try:
        values = np.array(h.data)
    except (ValueError, OverflowError):
        raise TensorError(name, "'data' is not a list of numbers of one nesting depth "
                          "(ragged)") from None
    if datatype == "UINT64" and values.dtype.kind not in _INT_KINDS:
        # Integers under 2**63 with others past it have no common numpy integer type
        # (numpy makes them float64, losing the large ones): read them as integers.
        exact = np.array(h.data, dtype=object)
        if all(type(v) is int for v in exact.flat):
            with contextlib.suppress(OverflowError):  # out of range: refused below
                values = exact.astype(np.uint64)
    if values.size != count:
        raise TensorError(name, f"'data' has {values.size} elements, but shape "
                          f"{echo.dims(h.shape)} needs {count}")
    if count and not _fits(values, datatype):
        raise TensorError(name, f"'data' holds values that are not {datatype} "
                          f"({'true/false' if datatype == 'BOOL' else 'numbers in range'})")
    with np.errstate(over="ignore"):  # a float past the datatype's range is inf, as in Triton
        return shaped(name, values.astype(np_dtype).reshape(-1), h.shape)


def _fits(values: np.ndarray, datatype: str) -> bool:
    kind = values.dtype.kind
    if datatype == "BOOL":
        return kind == "b"
    if datatype.startswith(("FP",)):
        return kind in _FLOAT_KINDS
    if kind not in _INT_KINDS:
        return False
    info = np.iinfo(DTYPES[datatype])
    return bool(values.min() >= info.min and values.max() <= info.max)


def _requested_outputs(outputs: Any) -> tuple[RequestedOutput, ...]:
    if not isinstance(outputs, list):
        raise InvalidArgument("request 'outputs' must be a list")
    wanted = []
    seen: set[str] = set()
    for index, output in enumerate(outputs):
        output = _object(output, f"requested output #{index}")
        name = output.get("name")
        if not isinstance(name, str) or not name:
            raise TensorError("", f"requested output #{index} has no 'name'")
        if name in seen:
            raise TensorError(name, "requested more than once")
        seen.add(name)
        params = _parameters(output, f"requested output '{echo.text(name)}'")
        if _CLASSIFICATION_KEY in params:
            raise TensorError(name, "the classification extension is not supported")
        binary = params.get(_BINARY_DATA_KEY)
        if binary is not None and not isinstance(binary, bool):
            raise TensorError(name, f"parameter '{_BINARY_DATA_KEY}' must be true or false")
        wanted.append(RequestedOutput(name, binary, _region(name, params)))
    return tuple(wanted)


def _region(name: str, params: dict[str, Any]) -> RegionRef | None:
    """The tensor's region from its shared_memory_* parameters (None: not in one), by the
    gRPC form's rules: the JSON values become the InferParameters gRPC would carry."""
    if not any(key in params for key in _SHARED_MEMORY_KEYS):
        return None
    wire = {}
    for key in _SHARED_MEMORY_KEYS:
        if key in params:
            wire[key] = _infer_parameter(name, key, params[key])
    return shared_memory_ref(name, wire)


def _infer_parameter(name: str, key: str, value: Any) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if not -2**63 <= value < 2**63:
            raise TensorError(name, f"parameter {key} is out of range")
        return pb.InferParameter(int64_param=value)
    if isinstance(value, str):
        return pb.InferParameter(string_param=value)
    raise TensorError(name, f"parameter {key} must be a string or an integer")


def output_regions(plan: Sequence[RequestedOutput]) -> dict[str, RegionRef]:
    """The planned outputs that go into a shared-memory region, by name."""
    return {o.name: o.region for o in plan if o.region is not None}


def _datatype_problem(datatype: Any) -> str:
    if datatype == "BYTES":
        return "datatype BYTES (strings) is not supported by trtserve"
    supported = [d for d in KSERVE_DATATYPES if d != "BYTES"]
    shown = echo.text(datatype) if isinstance(datatype, str) else datatype
    return f"unknown datatype {shown!r}; expected one of {supported}"


# --- responses -------------------------------------------------------------------------


def plan_outputs(request: JsonInferRequest,
                 model_outputs: Mapping[str, str]) -> tuple[RequestedOutput, ...]:
    """Each output to return and whether as binary, checked against the model's outputs
    (name -> datatype, in the model's order) before the request runs."""
    if not request.outputs:
        return tuple(RequestedOutput(name, request.binary_default) for name in model_outputs)
    plan = []
    for output in request.outputs:
        datatype = model_outputs.get(output.name)
        if datatype is None:
            raise TensorError(output.name, "requested output is not an output of this model; "
                              f"its outputs are {sorted(model_outputs)}")
        if output.region is not None:
            plan.append(output)
            continue
        binary = request.binary_default if output.binary is None else output.binary
        if not binary and datatype == "BF16":
            raise TensorError(output.name, "BF16 has no JSON form; request it with "
                              f"parameter '{_BINARY_DATA_KEY}' true")
        plan.append(RequestedOutput(output.name, binary))
    return tuple(plan)


def encode_infer(request_id: str, result: InferResult,
                 plan: Sequence[RequestedOutput]) -> tuple[list[bytes], int | None]:
    """The response body's parts (JSON header, then binary outputs in order) and the
    JSON header's length when binary data follows it (None: the body is all JSON)."""
    outputs = []
    chunks: list[bytes] = []
    for wanted in plan:
        tensor = result.outputs[wanted.name]
        array = tensor.data
        entry: dict[str, Any] = {"name": wanted.name, "datatype": tensor.dtype,
                                 "shape": list(tensor.shape)}
        if isinstance(array, RegionRef):
            # Its bytes are in the client's region: described (name, datatype, shape) and
            # nothing else, as Triton answers. perf_analyzer reads `binary_data_size` from
            # any output that has parameters, so none are sent.
            pass
        elif wanted.binary:
            if array.dtype.kind == "V":  # ml_dtypes bfloat16: the same bytes as uint16
                array = array.view(np.uint16)
            data = encode(array)
            entry["parameters"] = {_BINARY_SIZE_KEY: len(data)}
            chunks.append(data)
        else:
            # tolist() converts in C; FP16 becomes Python floats.
            entry["data"] = array.ravel().tolist()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": result.model, "model_version": result.version,
                              "outputs": outputs}
    if request_id:
        answer["id"] = request_id
    header = dumps(answer)
    return [header, *chunks], (len(header) if chunks else None)


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def error_body(message: str) -> bytes:
    """KServe's error object: {"error": "..."}."""
    return dumps({"error": message})


# --- metadata, configuration, statistics -----------------------------------------------


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton writes it in JSON: proto field names, every field
    (defaults and unset messages included, which perf_analyzer expects) but the unset
    choices of a oneof, enums by name, 64-bit integers as numbers (protobuf's
    json_format would write them as strings)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {key: _value(value_field, item) for key, item in value.items()}
        elif field.is_repeated:
            out[field.name] = [_value(field, item) for item in value]
        elif field.containing_oneof is not None and not message.HasField(field.name):
            continue
        else:
            out[field.name] = _value(field, value)
    return out


def _value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    return value


# --- repository and shared-memory requests (bodies of the extensions' POSTs) -----------


def body_object(body: bytes, what: str) -> dict[str, Any]:
    """An optional JSON object body: empty (as tritonclient sends some) is {}."""
    if not body.strip():
        return {}
    return _object(parse_json(body, what), what)


def index_ready(request: dict[str, Any]) -> bool:
    """`ready` of a repository index request (default false: every model)."""
    ready = request.get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidArgument("repository index: 'ready' must be true or false")
    return ready


def repository_parameters(request: dict[str, Any], rpc: str
                          ) -> dict[str, pb.ModelRepositoryParameter]:
    """The `parameters` of a load or unload body as the gRPC form's messages, so that
    kserve_repository checks them by its one set of rules."""
    params = _object(request.get("parameters", {}), f"{rpc} 'parameters'")
    wire = {}
    for key, value in params.items():
        if isinstance(value, bool):
            wire[key] = pb.ModelRepositoryParameter(bool_param=value)
        elif _int(value) and -2**63 <= value < 2**63:
            wire[key] = pb.ModelRepositoryParameter(int64_param=value)
        elif isinstance(value, str):
            wire[key] = pb.ModelRepositoryParameter(string_param=value)
        else:
            raise InvalidArgument(f"{rpc}: parameter '{echo.text(key)}' must be a string, "
                                  "an integer or true/false")
    return wire


def _count(request: dict[str, Any], key: str, what: str, default: int | None = None) -> int:
    value = request.get(key, default)
    if value is None:
        raise InvalidArgument(f"{what}: '{key}' is required")
    if not _int(value) or value < 0:
        raise InvalidArgument(f"{what}: '{key}' must be a non-negative integer")
    return int(value)


def system_register(request: dict[str, Any]) -> tuple[str, int, int]:
    """(key, offset, byte_size) of a system region's register body."""
    what = "system shared-memory register"
    key = request.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"{what}: 'key' must be a non-empty string (the shared-memory "
                              "object's name)")
    return (key, _count(request, "offset", what, default=0),
            _count(request, "byte_size", what))


def cuda_register(request: dict[str, Any]) -> tuple[bytes, int, int]:
    """(raw_handle, device_id, byte_size) of a CUDA region's register body; the handle
    travels as {"b64": base64 of the cudaIpcMemHandle_t}."""
    what = "CUDA shared-memory register"
    handle = request.get("raw_handle")
    b64 = handle.get("b64") if isinstance(handle, dict) else None
    if not isinstance(b64, str):
        raise InvalidArgument(f"{what}: 'raw_handle' must be {{\"b64\": base64 of the "
                              "cudaIpcMemHandle_t}")
    try:
        # Triton's C++ client encodes with libb64, which breaks lines every 72 characters.
        raw = base64.b64decode("".join(b64.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{what}: 'raw_handle.b64' is not valid base64") from None
    return raw, _count(request, "device_id", what), _count(request, "byte_size", what)
