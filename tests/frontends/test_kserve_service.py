"""The KServe v2 servicer through trtserve's own generated stub, over real gRPC.

tritonclient (test_tritonclient.py) covers what a Triton user sees; this file
covers the protocol's corners it does not reach: typed contents both ways,
version handling, request parameters, the id on a stream error, every RPC we
answer UNIMPLEMENTED, and the configuration of models that do not batch or
run on TensorRT profiles.
"""

from __future__ import annotations

import queue

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tests.doubles.controlled import ControlledBackend
from trtserve.client.gen.inference import grpc_service_pb2 as pb
from trtserve.client.gen.inference import grpc_service_pb2_grpc as pb_grpc
from trtserve.client.gen.inference import model_config_pb2 as mc
from trtserve.service.backends.base import LoadedModel, ModelSpec, ProfileSpec, WorkerInfo
from trtserve.service.config import ModelConfig
from trtserve.service.engine.model import ModelRuntime
from trtserve.service.frontends import kserve, kserve_model_config
from trtserve.service.tensors import TensorSpec
from trtserve.service.testing.servers import running_server, server_config

FIXED_ROWS = 4


@pytest.fixture(scope="module")
def fixed_onnx(tmp_path_factory: pytest.TempPathFactory):
    """No batch dimension: x FP32 [4, 8] -> y = relu(x); k INT32 [4, 8] -> m = k * k."""
    shape = [FIXED_ROWS, 8]
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Mul", ["k", "k"], ["m"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("k", TensorProto.INT32, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape),
         helper.make_tensor_value_info("m", TensorProto.INT32, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("fixed") / "fixed.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def server(example_onnx, fixed_onnx):
    config = server_config(
        ModelConfig(name="example", path=str(example_onnx), workers=1, max_batch_size=16,
                    max_queue_delay_us=0),
        ModelConfig(name="fixed", path=str(fixed_onnx), workers=1),
        # Batches wait 200 ms for company: long enough for a request timeout to pass.
        ModelConfig(name="slow", path=str(example_onnx), workers=1, max_batch_size=16,
                    max_queue_delay_us=200_000),
    )
    with running_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def reference(example_onnx):
    session = ort.InferenceSession(str(example_onnx), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input": x})[0]


def _request(x: np.ndarray, model: str = "example", **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    return request


def _raw_output(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    tensor = response.outputs[index]
    assert tensor.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[index], np.float32).reshape(
        tuple(tensor.shape))


def _code(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, **kwargs)
    return e.value.code(), e.value.details()


# --- inference ----------------------------------------------------------------------------


def test_typed_contents_in_and_out(stub, reference):
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="example", id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    wanted = request.outputs.add(name="output")
    wanted.parameters["binary_data"].bool_param = False
    response = stub.ModelInfer(request)
    assert response.id == "typed" and not response.raw_output_contents
    out = response.outputs[0]
    assert (out.name, out.datatype, list(out.shape)) == ("output", "FP32", [2, 16])
    got = np.array(out.contents.fp32_contents, np.float32).reshape(2, 16)
    np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)


def test_raw_contents_and_version_one(stub, reference):
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    response = stub.ModelInfer(_request(x, model_version="1", id="v1"))
    assert (response.model_name, response.model_version, response.id) == ("example", "1", "v1")
    np.testing.assert_allclose(_raw_output(response), reference(x), rtol=1e-5, atol=1e-5)


def test_a_model_without_a_batch_dimension(stub):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((FIXED_ROWS, 8)).astype(np.float32)
    k = rng.integers(-100, 100, (FIXED_ROWS, 8)).astype(np.int32)
    request = pb.ModelInferRequest(model_name="fixed")
    request.inputs.add(name="x", datatype="FP32", shape=x.shape).contents.fp32_contents.extend(
        x.ravel().tolist())
    request.inputs.add(name="k", datatype="INT32", shape=k.shape).contents.int_contents.extend(
        k.ravel().tolist())
    request.outputs.add(name="m")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["m"]
    m = np.frombuffer(response.raw_output_contents[0], np.int32).reshape(FIXED_ROWS, 8)
    np.testing.assert_array_equal(m, k * k)


def test_wrong_version_and_unknown_model_are_not_found(stub):
    x = np.zeros((1, 64), np.float32)
    code, details = _code(stub.ModelInfer, _request(x, model_version="2"))
    assert code == grpc.StatusCode.NOT_FOUND and "'2'" in details
    code, details = _code(stub.ModelInfer, _request(x, model="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "'nope'" in details
    for rpc, request in ((stub.ModelMetadata, pb.ModelMetadataRequest(name="example",
                                                                      version="x")),
                         (stub.ModelConfig, pb.ModelConfigRequest(name="nope")),
                         (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope")),
                         (stub.ModelStatistics, pb.ModelStatisticsRequest(version="9"))):
        assert _code(rpc, request)[0] == grpc.StatusCode.NOT_FOUND
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="example", version="1")).ready


def test_sequence_parameters_are_refused(stub):
    request = _request(np.zeros((1, 64), np.float32))
    request.parameters["sequence_id"].int64_param = 7
    code, details = _code(stub.ModelInfer, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sequence_id" in details
    # Zero means "no sequence", as tritonclient may send it.
    request.parameters["sequence_id"].int64_param = 0
    stub.ModelInfer(request)


def test_timeout_parameter_is_a_queue_deadline(stub):
    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0]
    request = _request(np.zeros((1, 64), np.float32), model="slow")
    request.parameters["timeout"].int64_param = 20_000  # 20 ms; the batch waits 200 ms
    code, details = _code(stub.ModelInfer, request)
    # Ended at its timeout by the frontend (answered_by), not by the batcher once the
    # batch's 200 ms delay is over ("deadline passed while queued").
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "timeout (deadline) passed" in details
    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow")).model_stats[0]
    assert after.execution_count == before.execution_count
    assert after.inference_stats.fail.count == before.inference_stats.fail.count + 1
    request.parameters["timeout"].string_param = "soon"
    assert _code(stub.ModelInfer, request)[0] == grpc.StatusCode.INVALID_ARGUMENT


# --- streaming -------------------------------------------------------------------------------


def test_stream_error_carries_the_request_id_and_the_stream_goes_on(stub, reference):
    rng = np.random.default_rng(3)
    xs = {f"s{i}": rng.standard_normal((1, 64)).astype(np.float32) for i in range(6)}
    bad = _request(np.zeros((1, 64), np.float32), id="bad")
    bad.inputs[0].datatype = "FP16"  # the model takes FP32
    bad.raw_input_contents[0] = np.zeros((1, 64), np.float16).tobytes()
    requests = [_request(x, id=i) for i, x in list(xs.items())[:3]] + [bad] + \
        [_request(x, id=i) for i, x in list(xs.items())[3:]]
    responses = list(stub.ModelStreamInfer(iter(requests), timeout=30))
    assert len(responses) == len(requests)
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1
    assert errors[0].infer_response.id == "bad"
    assert errors[0].infer_response.model_name == "example"
    assert "'input'" in errors[0].error_message and "FP16" in errors[0].error_message
    for r in responses:
        if r.error_message:
            continue
        answer = r.infer_response
        assert answer.parameters["triton_final_response"].bool_param
        np.testing.assert_allclose(_raw_output(answer), reference(xs[answer.id]), rtol=1e-5,
                                   atol=1e-5)


def test_stream_answers_while_the_client_keeps_sending(stub):
    """Responses flow before the request stream ends (a bidi stream, not a batch)."""
    outbox: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def requests():
        while (item := outbox.get()) is not None:
            yield item

    call = stub.ModelStreamInfer(requests(), timeout=30)
    try:
        for i in range(3):
            outbox.put(_request(np.full((1, 64), i, np.float32), id=str(i)))
            assert next(call).infer_response.id == str(i)
    finally:
        outbox.put(None)
    assert list(call) == []


# --- what is not implemented --------------------------------------------------------------


IMPLEMENTED = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
               "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
               "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
               "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus",
               "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
               "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload"}


def test_every_other_rpc_answers_unimplemented_saying_why(stub):
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    others = [m for m in service.methods if m.name not in IMPLEMENTED]
    assert {m.name for m in others} == set(kserve._NOT_IMPLEMENTED)
    for method in others:
        request_class = getattr(pb, method.input_type.name)
        code, details = _code(getattr(stub, method.name), request_class())
        assert code == grpc.StatusCode.UNIMPLEMENTED, method.name
        assert details.startswith(f"{method.name} is not implemented by trtserve: "), details


# --- configuration ---------------------------------------------------------------------------


def test_config_of_a_model_without_a_batch_dimension(stub):
    config = stub.ModelConfig(pb.ModelConfigRequest(name="fixed")).config
    assert config.max_batch_size == 0
    assert [(i.name, mc.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("x", "TYPE_FP32", [FIXED_ROWS, 8]), ("k", "TYPE_INT32", [FIXED_ROWS, 8])]
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in config.output] == [
        ("y", "TYPE_FP32", [FIXED_ROWS, 8]), ("m", "TYPE_INT32", [FIXED_ROWS, 8])]
    assert config.WhichOneof("scheduling_choice") is None
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name="fixed"))
    assert [list(t.shape) for t in metadata.inputs] == [[FIXED_ROWS, 8], [FIXED_ROWS, 8]]


def _tensorrt_runtime(profiles: int, workers_per_profile: int) -> ModelRuntime:
    """An unstarted runtime whose spec reads like a two-profile TensorRT engine.

    Its executors are test doubles; only the description is under test, and the
    runtime is never started, so the device each worker reports at start is set
    the way `ModelRuntime.start` sets it.
    """
    ranges = {"x": ((1, 8), (8, 8), (32, 8))}
    spec = ModelSpec(
        backend="tensorrt", platform="tensorrt_plan",
        inputs=(TensorSpec("x", "FP16", (-1, 8)),), outputs=(TensorSpec("y", "BF16", (-1, 8)),),
        max_batch_size=32,
        profiles=tuple(ProfileSpec(i, ranges) for i in range(profiles)),
    )
    double = ControlledBackend(max_batch_size=32).load(profiles * workers_per_profile)
    config = ModelConfig(name="engine", path="/models/engine.plan", backend="tensorrt",
                         workers=workers_per_profile, device=1, max_batch_size=32,
                         preferred_batch_sizes=(32, 16), max_queue_delay_us=100,
                         graph_batch_sizes=(1, 8, 32))
    runtime = ModelRuntime(config, LoadedModel(spec, double.factories))
    for stats in runtime.worker_stats:
        stats.info = WorkerInfo(device="cuda:1")
    return runtime


def test_config_of_a_tensorrt_engine_names_each_groups_profile():
    config = kserve_model_config.model_config(_tensorrt_runtime(profiles=2,
                                                                workers_per_profile=2).description())
    assert (config.platform, config.backend, config.max_batch_size) == (
        "tensorrt_plan", "tensorrt", 32)
    assert config.default_model_filename == "engine.plan"
    assert [(mc.DataType.Name(i.data_type), list(i.dims)) for i in config.input] == [
        ("TYPE_FP16", [8])]
    assert [mc.DataType.Name(o.data_type) for o in config.output] == ["TYPE_BF16"]
    # Sizes above max_batch_size are dropped, as the batcher drops them.
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    groups = [(g.name, mc.ModelInstanceGroup.Kind.Name(g.kind), g.count, list(g.gpus),
               list(g.profile)) for g in config.instance_group]
    assert groups == [("engine_0", "KIND_GPU", 2, [1], ["0"]),
                      ("engine_1", "KIND_GPU", 2, [1], ["1"])]
    assert config.optimization.cuda.graphs
    assert [g.batch_size for g in config.optimization.cuda.graph_spec] == [1, 8, 32]


def test_statistics_of_an_idle_model_are_zero():
    stats = kserve_model_config.model_statistics(_tensorrt_runtime(1, 1).snapshot())
    assert (stats.name, stats.version, stats.last_inference) == ("engine", "1", 0)
    assert stats.inference_count == stats.execution_count == 0
    assert not stats.batch_stats
    assert stats.inference_stats.success.count == 0


# --- trtserve's own Python client, speaking KServe ------------------------------------------


def test_python_kserve_client(server, reference):
    from trtserve.client.client import InferenceError, KServeClient

    x = np.random.default_rng(4).standard_normal((5, 64)).astype(np.float32)
    with KServeClient(server.url) as k:
        assert k.live() and k.ready() and k.model_ready("example")
        assert "statistics" in k.server_metadata().extensions
        assert [list(t.shape) for t in k.metadata("example").inputs] == [[-1, 64]]
        assert k.config("example").max_batch_size == 16
        before = k.statistics("example").model_stats[0].inference_stats.success.count
        out = k.infer("example", {"input": x}, outputs=["output"], request_id="py")
        np.testing.assert_allclose(out["output"], reference(x), rtol=1e-5, atol=1e-5)
        after = k.statistics("example").model_stats[0].inference_stats.success.count
        assert after == before + 1
        with pytest.raises(InferenceError) as e:
            k.infer("example", {"input": x[:, :3]})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_infers_over_kserve_and_prints_the_config(server, capsys):
    import json

    from trtserve.client import cli

    assert cli.main(["--url", server.url, "infer", "--model", "example", "--rows", "3",
                     "--protocol", "kserve", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["output"]["shape"] == [3, 16]
    assert cli.main(["--url", server.url, "config", "--model", "fixed"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["name"] == "fixed" and "max_batch_size" not in config  # 0: not batching
    assert cli.main(["--url", server.url, "config", "--model", "nope"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
