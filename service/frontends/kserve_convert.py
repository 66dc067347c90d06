"""KServe v2 (Open Inference Protocol) inference messages <-> numpy arrays.

Pure conversion, no server logic: the KServe servicer decodes a
ModelInferRequest here, hands the arrays to the same core as trtserve.v1, and
encodes the result here.

Datatypes: the KServe strings ("FP32", "INT64", ...) are the same names
`trtserve.service.tensors.DTYPES` uses, so both frontends share one table. BF16 has no
numpy dtype; it is carried as uint16 arrays holding the bfloat16 bit patterns
(`trtserve.service.tensors.bf16_to_fp32` widens them). A client holding ml_dtypes
bfloat16 arrays, as tritonclient does, gets the same bits with
`.view(np.uint16)`. BYTES (variable-length strings) is not supported.

Tensor data arrives either as `raw_input_contents` (one little-endian blob per
input, in input order: numpy views the blob without copying, though protobuf's
Python API copies a bytes field out of the message when it is read) or as
typed `contents` (one repeated field per element type: the protocol's slow
path, converted in one C-level pass per tensor). Every client mistake raises
`trtserve.service.errors.TensorError`, which names the tensor and is answered as
INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np

from trtserve.client.dtypes import DTYPES, dtype_name, encode
from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.service import echo
from trtserve.service.engine.api import RegionRef, TensorOut
from trtserve.service.errors import TensorError
from trtserve.service.tensors import decode, shaped

# Every datatype string the protocol defines. BYTES is known (so its error
# says "not supported" rather than "unknown") but has no entry in DTYPES.
KSERVE_DATATYPES: tuple[str, ...] = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
)
assert set(DTYPES) == set(KSERVE_DATATYPES) - {"BYTES"}, "trtserve.service.tensors.DTYPES changed"

# The InferTensorContents field that carries each datatype, and the numpy type
# of that field's elements (narrow integers travel widened to 32 bits). FP16
# and BF16 have no field: the protocol sends them only as raw bytes.
_TYPED_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
    "bytes_contents": np.dtype(object),
}

# Parameters that ask for features trtserve does not have. Ignoring them would
# answer a different question than the one asked, so they are refused.
_CLASSIFICATION_KEY = "classification"
# A tensor in a registered shared-memory region (Triton's shared-memory extensions):
# its region, the offset in the region (default 0) and its size in bytes (required).
_SHARED_MEMORY_KEY = "shared_memory_region"
_SHARED_MEMORY_OFFSET_KEY = "shared_memory_offset"
_SHARED_MEMORY_SIZE_KEY = "shared_memory_byte_size"
_BINARY_DATA_KEY = "binary_data"


def to_numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype that holds a KServe datatype (little-endian; BF16 -> uint16).

    Raises ValueError for BYTES (not supported) and for unknown strings.
    """
    np_dtype = DTYPES.get(datatype)
    if np_dtype is None:
        raise ValueError(_datatype_problem(datatype))
    return np_dtype


def to_kserve_datatype(dtype: np.dtype | type) -> str:
    """The KServe datatype of a numpy dtype.

    uint16 is UINT16: BF16 is never guessed from plain numpy data (pass
    `datatypes` to `encode_outputs` for that); an ml_dtypes bfloat16 dtype is
    BF16. Raises ValueError for dtypes the protocol cannot carry.
    """
    dtype = np.dtype(dtype)
    if _is_ml_bfloat16(dtype):
        return "BF16"
    return dtype_name(dtype)


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, np.ndarray | RegionRef]:
    """The request's inputs as arrays (or region references), keyed by name, in request order.

    Raw inputs are read-only arrays over the bytes protobuf hands out for each
    raw_input_contents entry (numpy adds no copy); typed inputs are fresh
    arrays; inputs in a shared-memory region are references, which the engine
    checks against the region and reads. Raises TensorError naming the tensor
    for every malformed input; see the module docstring for the rules.
    """
    check_raw_contents(request)
    inputs = request.inputs
    raw = request.raw_input_contents
    n_raw = len(raw)
    # As in Triton, raw_input_contents holds one entry per input that is not in
    # shared memory, in input order (what tritonclient sends).
    raw_index = 0

    arrays: dict[str, np.ndarray | RegionRef] = {}
    for index, tensor in enumerate(inputs):
        name = tensor.name
        if not name:
            raise TensorError("", f"input #{index} has an empty name")
        if name in arrays:
            raise TensorError(name, "appears more than once in the request's inputs")
        ref = shared_memory_ref(name, tensor.parameters)
        datatype = tensor.datatype
        np_dtype = DTYPES.get(datatype)
        if np_dtype is None:
            raise TensorError(name, _datatype_problem(datatype))
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape):
            raise TensorError(name, f"shape {echo.dims(shape)} has a negative dimension; a request "
                              "gives concrete sizes")
        if ref is not None:
            if tensor.HasField("contents"):
                raise TensorError(name, "has typed contents and a shared-memory region; "
                                  "send one or the other")
            arrays[name] = ref
        elif n_raw:
            if tensor.HasField("contents"):
                raise TensorError(name, "has typed contents, but the request also uses "
                                  "raw_input_contents; use one or the other for all inputs")
            # Each read of a repeated bytes entry copies it out of the message
            # (upb), so it is read exactly once.
            arrays[name] = decode(name, datatype, shape, raw[raw_index])
            raw_index += 1
        else:
            arrays[name] = _decode_typed(tensor, datatype, np_dtype, shape)
    return arrays


def check_raw_contents(request: pb.ModelInferRequest) -> None:
    """Refuse a request whose raw_input_contents are not one per input outside shared
    memory (or none)."""
    n_raw = len(request.raw_input_contents)
    if not n_raw:
        return
    inputs = request.inputs
    # Cheap even for a hostile request: a count beyond the inputs is refused first.
    if n_raw > len(inputs):
        # More blobs than inputs: no tensor is at fault, so none is named.
        raise TensorError(
            "",
            f"the request has {n_raw} raw_input_contents entries but only {len(inputs)} "
            "inputs (one entry per input, in input order)",
        )
    wire = [t for t in inputs if _SHARED_MEMORY_KEY not in t.parameters]
    if n_raw == len(wire):
        return
    for tensor in inputs:
        if _SHARED_MEMORY_KEY in tensor.parameters:
            # A malformed region reference explains the count better than the count.
            shared_memory_ref(tensor.name, tensor.parameters)
    # The words of a request without shared memory stay as they were.
    kind, rule = (("inputs", "one per input, in input order") if len(wire) == len(inputs)
                  else ("inputs not in shared memory",
                        "one per input not in shared memory, in input order"))
    if n_raw < len(wire):
        raise TensorError(
            wire[n_raw].name,
            f"has no raw_input_contents entry: the request has {len(wire)} {kind} but "
            f"{n_raw} raw_input_contents entries ({rule})",
        )
    raise TensorError(
        "",
        f"the request has {n_raw} raw_input_contents entries but only {len(wire)} {kind} "
        f"({rule})",
    )


def shared_memory_ref(name: str, params: Mapping[str, pb.InferParameter]) -> RegionRef | None:
    """The tensor's region reference from its shared_memory_* parameters; None: not in one."""
    if _SHARED_MEMORY_KEY not in params:
        for key in (_SHARED_MEMORY_OFFSET_KEY, _SHARED_MEMORY_SIZE_KEY):
            if key in params:
                raise TensorError(name, f"parameter {key} is set without "
                                  f"{_SHARED_MEMORY_KEY}")
        return None
    region_param = params[_SHARED_MEMORY_KEY]
    if region_param.WhichOneof("parameter_choice") != "string_param" \
            or not region_param.string_param:
        raise TensorError(name, f"parameter {_SHARED_MEMORY_KEY} must be a non-empty "
                          "string_param naming a registered region")
    if _SHARED_MEMORY_SIZE_KEY not in params:
        raise TensorError(name, f"parameter {_SHARED_MEMORY_SIZE_KEY} is required with "
                          f"{_SHARED_MEMORY_KEY}")
    byte_size = _int_param(name, _SHARED_MEMORY_SIZE_KEY, params[_SHARED_MEMORY_SIZE_KEY])
    offset = 0
    if _SHARED_MEMORY_OFFSET_KEY in params:
        offset = _int_param(name, _SHARED_MEMORY_OFFSET_KEY, params[_SHARED_MEMORY_OFFSET_KEY])
    return RegionRef(region_param.string_param, offset, byte_size)


def _int_param(name: str, key: str, param: pb.InferParameter) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind not in ("int64_param", "uint64_param"):
        raise TensorError(name, f"parameter {key} must be an int64_param or uint64_param")
    value: int = getattr(param, kind)
    if value < 0:
        raise TensorError(name, f"parameter {key} is {value}; it must not be negative")
    return value


def output_regions(request: pb.ModelInferRequest) -> dict[str, RegionRef]:
    """Requested outputs that go into a shared-memory region, by name."""
    regions: dict[str, RegionRef] = {}
    for requested in request.outputs:
        ref = shared_memory_ref(requested.name, requested.parameters)
        if ref is not None:
            regions[requested.name] = ref
    return regions


def check_requested_outputs(
    request: pb.ModelInferRequest,
    output_names: Collection[str],
    datatypes: Mapping[str, str] | None = None,
) -> None:
    """Refuse a request before it runs if it asks for an output the model lacks,
    or asks for one in a way trtserve cannot answer (`datatypes`, the model's
    output datatypes, lets this catch FP16/BF16 asked for as typed contents)."""
    _requested(request, output_names, datatypes or {})


def encode_outputs(
    request: pb.ModelInferRequest,
    outputs: Mapping[str, np.ndarray | TensorOut],
    model_name: str,
    model_version: str,
    request_id: str,
    *,
    datatypes: Mapping[str, str] | None = None,
) -> pb.ModelInferResponse:
    """The response for `request`, given every output the model produced.

    Honours `request.outputs`: only the requested outputs, in the order
    requested; all outputs (in `outputs` order) when none are requested. An
    output goes in `raw_output_contents` unless its request sets the
    parameter `binary_data` to false, in which case it goes in typed contents.

    An output the engine wrote into a shared-memory region (a TensorOut) is
    described (name, datatype, shape) with an empty raw_output_contents entry,
    as Triton answers, so that clients index raw outputs by output position.

    `datatypes` gives an output's KServe datatype where the array's dtype
    alone cannot say it; the case that needs it is BF16, carried as uint16.
    A datatype that does not match the array's dtype is a server bug and
    raises TypeError; client mistakes raise TensorError.
    """
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version,
                                     id=request_id)
    wanted = _requested(request, outputs.keys(), datatypes or {})
    # raw_output_contents[i] belongs to outputs[i], so every raw output must
    # come before the first typed one; clients look outputs up by name, so the
    # reordering (only when a request mixes the two) loses nothing.
    ordered = [item for item in wanted if item[1]] + [item for item in wanted if not item[1]]
    raw: list[bytes] = []
    for name, binary in ordered:
        array = outputs[name]
        if isinstance(array, TensorOut):
            declared = datatypes.get(name) if datatypes else None
            response.outputs.add(name=name, datatype=declared or array.dtype,
                                 shape=array.shape)
            raw.append(b"")
            continue
        datatype = _output_datatype(name, array, datatypes)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if binary:
            if array.dtype.kind == "V":  # ml_dtypes bfloat16: same bytes as uint16
                array = array.view(np.uint16)
            raw.append(encode(array))
        else:
            _check_typed_possible(name, datatype)
            # tolist() converts in C; the repeated field takes Python scalars.
            getattr(tensor.contents, _TYPED_FIELD[datatype]).extend(array.ravel().tolist())
    response.raw_output_contents.extend(raw)
    return response


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _datatype_problem(datatype: str) -> str:
    if datatype == "BYTES":
        return "datatype BYTES (strings) is not supported by trtserve"
    supported = [d for d in KSERVE_DATATYPES if d != "BYTES"]
    return f"unknown datatype {echo.text(datatype)!r}; expected one of {supported}"


def _is_ml_bfloat16(dtype: np.dtype) -> bool:
    # ml_dtypes registers bfloat16 as a 2-byte void-kind dtype; matching on the
    # name keeps ml_dtypes an optional import.
    return dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16"


def _decode_typed(
    tensor: pb.ModelInferRequest.InferInputTensor,
    datatype: str,
    np_dtype: np.dtype,
    shape: tuple[int, ...],
) -> np.ndarray:
    name = tensor.name
    count = math.prod(shape)
    if not tensor.HasField("contents"):
        if count == 0:
            return shaped(name, np.empty(0, dtype=np_dtype), shape)
        raise TensorError(name, f"has no data: the request has no raw_input_contents and the "
                          f"input has no contents, but shape {echo.dims(shape)} needs {count} "
                          "elements")
    field = _TYPED_FIELD.get(datatype)
    if field is None:
        raise TensorError(name, f"{datatype} data can only be sent in raw_input_contents; the "
                          "protocol has no typed contents field for it")
    contents = tensor.contents
    for other in _FIELD_DTYPE:
        if other != field and len(getattr(contents, other)):
            raise TensorError(name, f"{datatype} data belongs in contents.{field}, but "
                              f"contents.{other} is set")
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(name, f"contents.{field} has {len(values)} elements, but shape "
                          f"{echo.dims(shape)} needs {count}")
    wide = _FIELD_DTYPE[field]
    array = np.fromiter(values, dtype=wide, count=count)
    if wide != np_dtype:
        # INT8/16 and UINT8/16 travel as 32-bit values: narrowing must not wrap.
        info = np.iinfo(np_dtype)
        if count and (array.min() < info.min or array.max() > info.max):
            raise TensorError(name, f"contents.{field} holds values outside the {datatype} "
                              f"range [{info.min}, {info.max}]")
        array = array.astype(np_dtype)
    return shaped(name, array, shape)


def _requested(
    request: pb.ModelInferRequest, output_names: Collection[str], datatypes: Mapping[str, str]
) -> list[tuple[str, bool]]:
    """(name, binary) for each output to return, validated against the model."""
    if not request.outputs:
        return [(name, True) for name in output_names]
    wanted: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for requested in request.outputs:
        name = requested.name
        if name not in output_names:
            raise TensorError(name, f"requested output is not an output of this model; its "
                              f"outputs are {sorted(output_names)}")
        if name in seen:
            raise TensorError(name, "requested more than once")
        seen.add(name)
        params = requested.parameters
        if _CLASSIFICATION_KEY in params:
            raise TensorError(name, "the classification extension is not supported")
        if _SHARED_MEMORY_KEY in params:
            wanted.append((name, True))  # described, with an empty raw entry
            continue
        binary = True
        if _BINARY_DATA_KEY in params:
            param = params[_BINARY_DATA_KEY]
            if param.WhichOneof("parameter_choice") != "bool_param":
                raise TensorError(name, "parameter binary_data must be a bool_param")
            binary = param.bool_param
        declared = datatypes.get(name)
        if not binary and declared is not None:
            _check_typed_possible(name, declared)
        wanted.append((name, binary))
    return wanted


def _output_datatype(name: str, array: np.ndarray, datatypes: Mapping[str, str] | None) -> str:
    dtype = array.dtype
    declared = datatypes.get(name) if datatypes else None
    try:
        natural = to_kserve_datatype(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    except ValueError:
        raise TypeError(f"output {name!r} has dtype {dtype}, which the protocol cannot "
                        "carry") from None
    if declared is None or declared == natural:
        return natural
    if declared == "BF16" and natural == "UINT16":
        return "BF16"
    raise TypeError(f"output {name!r} is declared {declared} but its array is {dtype}")


def _check_typed_possible(name: str, datatype: str) -> None:
    if datatype not in _TYPED_FIELD:
        raise TensorError(name, f"{datatype} has no typed contents field in the protocol; "
                          "request it with binary_data true")


__all__ = [
    "KSERVE_DATATYPES",
    "TensorError",
    "check_raw_contents",
    "check_requested_outputs",
    "decode_inputs",
    "encode_outputs",
    "output_regions",
    "shared_memory_ref",
    "to_kserve_datatype",
    "to_numpy_dtype",
]


def answer_bytes(response: pb.ModelInferResponse) -> int:
    """About the bytes an answer holds (output data and id), from shapes and datatypes.

    Reading the contents would copy them, and ByteSize would serialize the answer.
    """
    size = len(response.id)
    for tensor in response.outputs:
        if _SHARED_MEMORY_KEY in tensor.parameters:
            continue  # written into the client's region: no bytes in the answer
        dtype = DTYPES.get(tensor.datatype)
        size += math.prod(tensor.shape) * (dtype.itemsize if dtype is not None else 8)
    return size
