"""Models that change while the server runs: load, unload and reload over trtserve.v1
and KServe v2, versions, health, stats, the atomic switch under load, failing reloads,
model control off, auth, and the file watch. Real gRPC, real ONNX Runtime."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.test_metrics import key, scrape
from trtserve.client.cli import main as client_main
from trtserve.client.client import AsyncClient, Client, InferenceError, KServeClient
from trtserve.client.gen.inference import grpc_service_pb2 as kpb
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service.config import ModelConfig
from trtserve.service.testing.onnx_models import offset_net
from trtserve.service.testing.servers import free_port, running_server, server_config

FEATURES = 4
TOKEN = "control-Token_0123"


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[int, Path]:
    """Two versions of one model: output = input + 1, and output = input + 2."""
    folder = tmp_path_factory.mktemp("versions")
    return {k: offset_net(folder / f"plus{k}.onnx", float(k), FEATURES) for k in (1, 2)}


def _model(path: Path, name: str = "m", **settings: object) -> ModelConfig:
    return ModelConfig(name=name, path=str(path), workers=2, **settings)  # type: ignore[arg-type]


def _x(rows: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, FEATURES)).astype(np.float32)


def _offset(client: Client, model: str = "m") -> float:
    x = _x()
    y = client.infer(model, {"input": x})["output"]
    offsets = np.unique(np.round(y - x, 4))
    assert offsets.size == 1, offsets
    return float(offsets[0])


def _health(url: str, service: str) -> int:
    with grpc.insecure_channel(url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _wait_for(predicate, timeout_s: float = 10.0) -> None:
    """Health follows a switch through a task on the server's loop: give it its turn."""
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_load_unload_and_reload_over_trtserve_v1(versions, tmp_path):
    with running_server(server_config(_model(versions[1]))) as s, Client(s.url) as c:
        [state] = c.list_models()
        assert (state.name, state.version, state.state, state.path) == (
            "m", "1", "READY", str(versions[1]))
        assert _offset(c) == 1.0

        state = c.unload_model("m")
        assert (state.state, state.version, state.reason) == ("UNAVAILABLE", "1", "unloaded")
        with pytest.raises(InferenceError) as err:
            _offset(c)
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "not loaded" in str(err.value)
        _wait_for(lambda: _health(s.url, "m") == NOT_SERVING)
        assert _health(s.url, "") == SERVING  # an unload is the operator's choice

        state = c.load_model("m")  # its configured file, as a new version
        assert (state.state, state.version) == ("READY", "2")
        assert _offset(c) == 1.0
        _wait_for(lambda: _health(s.url, "m") == SERVING)

        state = c.reload_model("m", str(versions[2]))
        assert (state.version, state.path) == ("3", str(versions[2]))
        assert _offset(c) == 2.0
        response = c._stub.Infer(pb.InferRequest(model="m", inputs=[pb.Tensor(
            name="input", dtype=pb.DATA_TYPE_FP32, shape=[1, FEATURES],
            data=_x().tobytes())]))
        assert response.model_version == "3"
        assert c.metadata("m").version == "3"
        [stats] = c.stats("m").models
        # The new version's counters: the request just made, and the one before it.
        assert (stats.version, stats.requests) == ("3", 2)

        # A model the server did not know: loaded from its file, with default settings.
        state = c.load_model("other", str(versions[2]))
        assert (state.name, state.version, state.state) == ("other", "1", "READY")
        assert _offset(c, "other") == 2.0
        assert [m.name for m in c.list_models()] == ["m", "other"]


def test_model_control_errors_name_what_was_wrong(versions):
    with running_server(server_config(_model(versions[1]))) as s, Client(s.url) as c:
        with pytest.raises(InferenceError) as err:
            c.load_model("new")  # unknown, and no file given
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "path" in str(err.value)
        with pytest.raises(InferenceError) as err:
            c.reload_model("absent")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(InferenceError) as err:
            c.unload_model("")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(InferenceError) as err:
            c.load_model("bad name!", str(versions[1]))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "models.bad name!.name" in str(err.value)


def test_kserve_repository_index_load_and_unload(versions):
    with running_server(server_config(_model(versions[1]))) as s, KServeClient(s.url) as k:
        [entry] = k.repository_index()
        assert (entry.name, entry.version, entry.state) == ("m", "1", "READY")
        assert k.model_ready("m")

        k.unload_model("m")
        assert not k.model_ready("m")
        assert k.repository_index(ready=True) == []
        [entry] = k.repository_index()
        assert (entry.state, entry.reason) == ("UNAVAILABLE", "unloaded")
        assert k.ready()  # the server serves on: what is loaded is ready

        k.load_model("m")
        assert k.model_ready("m") and k.model_ready("m", "2")
        # Triton: a load of a loaded model reloads it; `path` names another file.
        k.load_model("m", str(versions[2]))
        x = _x()
        request = kpb.ModelInferRequest(model_name="m", inputs=[
            kpb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                   shape=[1, FEATURES])],
            raw_input_contents=[x.tobytes()])
        response = k._stub.ModelInfer(request)
        assert response.model_version == "3"
        y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, FEATURES)
        np.testing.assert_allclose(y, x + 2)
        assert list(k.metadata("m").versions) == ["3"]
        assert k.statistics("m").model_stats[0].version == "3"

        # An older version is gone: NOT_FOUND naming the one served.
        with pytest.raises(InferenceError) as err:
            k.metadata("m", version="1")
        assert err.value.code == grpc.StatusCode.NOT_FOUND and "'3'" in str(err.value)
        assert not k.model_ready("m", "1")

        bad = kpb.RepositoryModelLoadRequest(model_name="m")
        bad.parameters["config"].string_param = "{}"
        with pytest.raises(grpc.RpcError) as rpc_err:
            k._stub.RepositoryModelLoad(bad)
        assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'config'" in rpc_err.value.details()
        assert "model_repository" in k.server_metadata().extensions


def test_a_failing_reload_leaves_the_old_version_serving_and_says_why(versions, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with running_server(server_config(_model(versions[1]))) as s, Client(s.url) as c, \
            KServeClient(s.url) as k:
        for attempt in (lambda: c.reload_model("m", str(broken)),
                        lambda: k.load_model("m", str(broken)),
                        lambda: c.reload_model("m", str(tmp_path / "missing.onnx"))):
            with pytest.raises(InferenceError) as err:
                attempt()
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
            message = str(err.value)
            assert "model 'm'" in message and "still serves" in message, message
            assert _offset(c) == 1.0
            [state] = c.list_models()
            assert (state.version, state.state, state.path) == ("1", "READY", str(versions[1]))
        assert "file not found" in message
        # A failure does not use up a version: the next success is "2".
        assert c.reload_model("m", str(versions[2])).version == "2"


def test_a_failing_first_load_is_unavailable_with_its_reason(versions, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00" * 64)
    with running_server(server_config(_model(versions[1]))) as s, Client(s.url) as c:
        with pytest.raises(InferenceError) as err:
            c.load_model("new", str(broken))
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "not served" in str(err.value)
        state = next(m for m in c.list_models() if m.name == "new")
        assert state.state == "UNAVAILABLE" and "broken.onnx" in state.reason


def test_model_control_off_refuses_on_both_protocols(versions):
    config = server_config(_model(versions[1]), model_control=False)
    with running_server(config) as s, Client(s.url) as c, KServeClient(s.url) as k:
        for call in (lambda: c.load_model("m"), lambda: c.unload_model("m"),
                     lambda: c.reload_model("m"), lambda: k.load_model("m"),
                     lambda: k.unload_model("m")):
            with pytest.raises(InferenceError) as err:
                call()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "model_control" in str(err.value)
        assert [m.state for m in c.list_models()] == ["READY"]  # reading is allowed
        assert [m.state for m in k.repository_index()] == ["READY"]
        assert _offset(c) == 1.0


def test_model_control_needs_the_token_when_auth_is_on(versions, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = server_config(_model(versions[1]), auth_token_file=str(token_file))
    with running_server(config) as s:
        with Client(s.url) as anonymous, KServeClient(s.url) as k:
            for call in (lambda: anonymous.reload_model("m"), lambda: anonymous.list_models(),
                         lambda: k.unload_model("m")):
                with pytest.raises(InferenceError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(s.url, token=TOKEN) as c:
            assert c.reload_model("m").version == "2"


def _infer_v1(stub: pb_grpc.InferenceServiceStub, x: np.ndarray):
    return stub.Infer(pb.InferRequest(model="m", inputs=[pb.Tensor(
        name="input", dtype=pb.DATA_TYPE_FP32, shape=list(x.shape), data=x.tobytes())]))


CLIENTS = 64


def test_a_reload_under_64_concurrent_clients_loses_nothing(versions):
    """Every request is answered, each by exactly one version (its offset and its
    model_version agree), and no client sees version 1 after it has seen version 2.
    A queue delay of 5 ms keeps requests queued in the old version at the switch."""
    config = server_config(_model(versions[1], max_queue_delay_us=5000))
    with running_server(config) as s:
        stop = threading.Event()
        reloaded = threading.Event()
        answers: list[list[tuple[str, float]]] = [[] for _ in range(CLIENTS)]
        errors: list[BaseException] = []

        def client(index: int) -> None:
            rng = np.random.default_rng(index)
            with grpc.insecure_channel(s.url) as channel:
                stub = pb_grpc.InferenceServiceStub(channel)
                try:
                    # Until the reload is done and this client has been answered by the
                    # new version twice (a request sent after the switch).
                    while not stop.is_set():
                        x = rng.standard_normal((int(rng.integers(1, 4)), FEATURES)
                                                ).astype(np.float32)
                        response = _infer_v1(stub, x)
                        y = np.frombuffer(response.outputs[0].data, np.float32).reshape(x.shape)
                        offsets = np.unique(np.round(y - x, 4))
                        assert offsets.size == 1, f"rows answered by different versions: {offsets}"
                        answers[index].append((response.model_version, float(offsets[0])))
                        if reloaded.is_set() and sum(
                                v == "2" for v, _ in answers[index][-2:]) == 2:
                            return
                except BaseException as e:
                    errors.append(e)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        # Every client has been answered by version 1 before the reload starts.
        _wait_for(lambda: all(answers) or bool(errors), 60)
        old = s.server.models.get("m")
        with Client(s.url) as c:
            state = c.reload_model("m", str(versions[2]))
        reloaded.set()
        for t in threads:
            t.join(60)
        stop.set()
        assert not errors, errors[:3]
        assert state.version == "2"
        for index, seen in enumerate(answers):
            assert set(seen) <= {("1", 1.0), ("2", 2.0)}, (index, set(seen))
            versions_seen = [v for v, _ in seen]
            first_new = versions_seen.index("2")
            assert "1" not in versions_seen[first_new:], (index, versions_seen)
        # The old version answered what it accepted, then stopped: its workers are gone.
        assert not old.ready and old.in_flight == 0 and old.queue_depth == 0
        workers = [t for t in threading.enumerate() if t.name.startswith("m-worker-")]
        assert len(workers) == 2, [t.name for t in workers]
        # Each version answered exactly the requests it took, and nothing failed.
        new = s.server.models.get("m")
        flat = [answer for seen in answers for answer in seen]
        assert (old.counters.requests, old.counters.success) == (flat.count(("1", 1.0)),) * 2
        assert (new.counters.requests, new.counters.success) == (flat.count(("2", 2.0)),) * 2
        with Client(s.url) as c:
            [stats] = c.stats("m").models
        assert stats.version == "2"


def test_reloads_of_one_model_take_turns(versions):
    with running_server(server_config(_model(versions[1]))) as s:
        def reload(path: Path) -> str:
            with Client(s.url) as c:
                return c.reload_model("m", str(path)).version

        results: list[str] = []
        threads = [threading.Thread(target=lambda p=p: results.append(reload(p)))
                   for p in (versions[2], versions[1], versions[2])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == ["2", "3", "4"]
        with Client(s.url) as c:
            assert [m.version for m in c.list_models()] == ["4"]
        workers = [t for t in threading.enumerate() if t.name.startswith("m-worker-")]
        assert len(workers) == 2, [t.name for t in workers]


def test_an_unload_under_load_answers_what_it_accepted(versions):
    """Requests in flight at the unload are answered; later ones get NOT_FOUND."""
    config = server_config(_model(versions[1], max_queue_delay_us=200))

    async def clients(url: str, unload) -> list[grpc.StatusCode | None]:
        async with grpc.aio.insecure_channel(url) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            outcomes: list[grpc.StatusCode | None] = []

            async def one() -> None:
                while True:
                    try:
                        await _infer_v1(stub, _x(2))
                        outcomes.append(None)
                    except grpc.aio.AioRpcError as e:
                        outcomes.append(e.code())
                        return

            tasks = [asyncio.create_task(one()) for _ in range(CLIENTS)]
            while len(outcomes) < 200:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(unload)
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return outcomes

    with running_server(config) as s, Client(s.url) as c:
        outcomes = asyncio.run(clients(s.url, lambda: c.unload_model("m")))
    failures = {code for code in outcomes if code is not None}
    assert failures == {grpc.StatusCode.NOT_FOUND}, failures
    assert outcomes.count(None) >= 200


def test_the_watch_reloads_a_changed_file(versions, tmp_path):
    served = tmp_path / "model.onnx"
    shutil.copyfile(versions[1], served)
    config = server_config(_model(served), model_watch_interval_s=0.05)
    with running_server(config) as s, Client(s.url) as c:
        assert _offset(c) == 1.0
        # Replaced as deployments do: written beside it, then renamed over it.
        staged = tmp_path / "model.onnx.tmp"
        shutil.copyfile(versions[2], staged)
        os.replace(staged, served)
        _wait_for(lambda: c.list_models()[0].version == "2", 30)
        assert _offset(c) == 2.0

        # A broken file is logged and not served; the version before serves on.
        staged.write_bytes(b"garbage")
        os.replace(staged, served)
        _wait_for(lambda: s.server.watch is not None and s.server.watch.reloads == 2, 30)
        [state] = c.list_models()
        assert (state.version, state.state) == ("2", "READY")
        assert _offset(c) == 2.0


def test_the_client_cli_lists_loads_and_reloads(versions, capsys):
    with running_server(server_config(_model(versions[1]))) as s:
        assert client_main(["--url", s.url, "models", "list"]) == 0
        assert f"m: READY, version 1, {versions[1]}" in capsys.readouterr().out
        assert client_main(["--url", s.url, "models", "reload", "m", "--path",
                            str(versions[2])]) == 0
        assert "m: READY, version 2" in capsys.readouterr().out
        assert client_main(["--url", s.url, "models", "unload", "m"]) == 0
        assert "m: UNAVAILABLE, version 2" in capsys.readouterr().out
        assert client_main(["--url", s.url, "models", "load", "m", "--json"]) == 0
        assert '"version": "3"' in capsys.readouterr().out
        assert client_main(["--url", s.url, "models", "reload", "nope"]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err


def test_metrics_follow_a_reload(versions):
    config = server_config(_model(versions[1]), metrics_port=free_port(),
                           metrics_render_interval_s=0)
    with running_server(config) as s, Client(s.url) as c:
        _offset(c)
        labels = {"model": "m", "backend": "onnxruntime", "platform": "onnxruntime_onnx"}
        assert scrape(config.metrics_port)["trtserve_model_info"] == {
            key(**labels, version="1"): 1}
        c.reload_model("m", str(versions[2]))
        samples = scrape(config.metrics_port)
        assert samples["trtserve_model_info"] == {key(**labels, version="2"): 1}
        # The new version's counters start at 0.
        assert samples["trtserve_model_requests_total"][key(model="m")] == 0


def test_the_async_client_controls_models(versions):
    async def control(url: str) -> None:
        async with AsyncClient(url) as c:
            assert (await c.reload_model("m", str(versions[2]))).version == "2"
            assert [m.version for m in await c.list_models()] == ["2"]
            assert (await c.unload_model("m")).state == "UNAVAILABLE"
            assert (await c.load_model("m")).version == "3"

    with running_server(server_config(_model(versions[1]))) as s:
        asyncio.run(control(s.url))
