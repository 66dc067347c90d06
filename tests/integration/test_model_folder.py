"""A repository folder (server.model_repository) served and followed while clients run:
models added, changed, removed; versions; a half-written file; a bad model beside good
ones; explicit load and unload beside the watch. Real files in tmp folders, real gRPC,
real ONNX Runtime; the models answer input + offset, so each answer tells which file ran.

Tests that must see each look of the watch one at a time set an interval of an hour and
call the watch's `check()` themselves: nothing then depends on how fast this machine is.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.integration.test_model_control import (
    FEATURES,
    NOT_SERVING,
    SERVING,
    _health,
    _offset,
    _wait_for,
    _x,
)
from trtserve.client.client import Client, InferenceError, KServeClient
from trtserve.service.errors import StartError
from trtserve.service.processes import EngineServer
from trtserve.service.testing.onnx_models import offset_net
from trtserve.service.testing.servers import ServerThread, running_server, server_config

HOUR_S = 3600.0  # the watch then looks only when a test calls check()


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[int, bytes]:
    """Model files by offset: output = input + offset."""
    folder = tmp_path_factory.mktemp("nets")
    return {k: offset_net(folder / f"plus{k}.onnx", float(k), FEATURES).read_bytes()
            for k in (1, 2, 3)}


def _place(path: Path, content: bytes) -> None:
    """Written beside, under a hidden name, then renamed into place, as deployments do."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.parent / f".{path.name}.partial"
    staged.write_bytes(content)
    os.replace(staged, path)


def _states(client: Client) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.version) for m in client.list_models()}


def _check(s: ServerThread) -> None:
    """One look of the folder watch."""
    watch = s.server.folder_watch
    assert watch is not None
    s.call(watch.check())


def test_the_folder_is_served_at_start_at_each_models_latest_version(nets, tmp_path):
    _place(tmp_path / "a" / "1" / "model.onnx", nets[1])
    _place(tmp_path / "a" / "2" / "model.onnx", nets[2])
    _place(tmp_path / "flat.onnx", nets[3])
    _place(tmp_path / "tuned" / "1" / "model.onnx", nets[1])
    _place(tmp_path / "tuned" / "config.toml", b"workers = 1\nmax_queue_delay_us = 250\n")
    config = server_config(model_repository=str(tmp_path))  # no watch: read at start only
    with running_server(config) as s, Client(s.url) as c, KServeClient(s.url) as k:
        assert _states(c) == {"a": ("READY", "2"), "flat": ("READY", "1"),
                              "tuned": ("READY", "1")}
        assert (_offset(c, "a"), _offset(c, "flat"), _offset(c, "tuned")) == (2.0, 3.0, 1.0)
        [tuned] = c.stats("tuned").models
        assert len(tuned.workers) == 1  # config.toml's settings
        assert [(m.name, m.version, m.state) for m in k.repository_index()] == [
            ("a", "2", "READY"), ("flat", "1", "READY"), ("tuned", "1", "READY")]
        assert s.server.folder_watch is None
        # Triton's explicit mode: nothing follows the folder, a load by name reads it.
        _place(tmp_path / "a" / "3" / "model.onnx", nets[3])
        assert _states(c)["a"] == ("READY", "2")
        k.load_model("a")
        assert _states(c)["a"] == ("READY", "3") and _offset(c, "a") == 3.0


def test_models_added_changed_and_removed_while_clients_run(nets, tmp_path):
    _place(tmp_path / "a" / "1" / "model.onnx", nets[1])
    config = server_config(model_repository=str(tmp_path), model_watch_interval_s=0.05)
    errors: list[BaseException] = []
    answers: list[tuple[str, float]] = []
    stop = threading.Event()

    def client_loop(url: str) -> None:
        with Client(url) as client:
            x = _x(2)
            while not stop.is_set():
                try:
                    response = client._stub.Infer(_request(x), timeout=30)
                except grpc.RpcError as e:
                    errors.append(e)
                    return
                y = np.frombuffer(response.outputs[0].data, np.float32).reshape(x.shape)
                offsets = np.unique(np.round(y - x, 4))
                answers.append((response.model_version, float(offsets[0])))
                if offsets.size != 1:
                    errors.append(AssertionError(f"mixed answer {offsets}"))

    with running_server(config) as s, Client(s.url) as c:
        clients = [threading.Thread(target=client_loop, args=(s.url,)) for _ in range(8)]
        for t in clients:
            t.start()
        try:
            # A new model folder: loaded.
            _place(tmp_path / "b" / "1" / "model.onnx", nets[3])
            _wait_for(lambda: _states(c).get("b") == ("READY", "1"), 60)
            assert _offset(c, "b") == 3.0
            # A new version of the model the clients call: served beside, then switched.
            _place(tmp_path / "a" / "2" / "model.onnx", nets[2])
            _wait_for(lambda: _states(c)["a"] == ("READY", "2"), 60)
            assert _offset(c, "a") == 2.0
            # A file changed in place (same version): reloaded.
            _place(tmp_path / "a" / "2" / "model.onnx", nets[3])
            _wait_for(lambda: _offset(c, "a") == 3.0, 60)
            # The highest version removed: the one below serves again.
            shutil.rmtree(tmp_path / "a" / "2")
            _wait_for(lambda: _states(c)["a"] == ("READY", "1"), 60)
            assert _offset(c, "a") == 1.0
            # A model folder removed: unloaded, and no longer listed.
            shutil.rmtree(tmp_path / "b")
            _wait_for(lambda: "b" not in _states(c), 60)
            with pytest.raises(InferenceError) as err:
                _offset(c, "b")
            assert err.value.code == grpc.StatusCode.NOT_FOUND
        finally:
            stop.set()
            for t in clients:
                t.join(30)
    assert not errors, errors[:3]
    # Every answer came from one file, and the version it names holds that file then.
    assert {offset for _, offset in answers} <= {1.0, 2.0, 3.0}
    assert all(offset == 1.0 for version, offset in answers if version == "1")
    assert {version for version, _ in answers} == {"1", "2"}


def _request(x: np.ndarray):
    from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb

    return pb.InferRequest(model="a", inputs=[pb.Tensor(
        name="input", dtype=pb.DATA_TYPE_FP32, shape=list(x.shape), data=x.tobytes())])


def test_a_file_still_being_written_is_not_loaded(nets, tmp_path, caplog):
    (tmp_path / "a").mkdir()
    config = server_config(model_repository=str(tmp_path), model_watch_interval_s=HOUR_S)
    caplog.set_level(logging.INFO, logger="trtserve.service.engine")
    with running_server(config) as s, Client(s.url) as c:
        # A model folder without a version yet: listed, not loadable, no failure.
        assert _states(c) == {"a": ("UNAVAILABLE", "")}
        target = tmp_path / "a" / "1" / "model.onnx"
        target.parent.mkdir()
        data = nets[2]
        with target.open("wb") as f:  # written in place, in two parts
            f.write(data[: len(data) // 2])
            f.flush()
            _check(s)  # the first look at it: a change, not yet settled
            assert _states(c) == {"a": ("UNAVAILABLE", "")}
            f.write(data[len(data) // 2:])
            f.flush()
            _check(s)  # it grew since: still not settled
            assert _states(c) == {"a": ("UNAVAILABLE", "")}
        loads = [r for r in caplog.records if "loading it" in r.getMessage()]
        assert not loads and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        _check(s)  # two looks agree: loaded whole
        assert _states(c)["a"] == ("READY", "1") and _offset(c, "a") == 2.0

        # Every version removed: unloaded, and listed with the reason.
        shutil.rmtree(target.parent)
        _check(s)
        assert _states(c)["a"] == ("READY", "1")  # one look: not settled yet
        _check(s)
        [a] = c.list_models()
        assert (a.state, a.version) == ("UNAVAILABLE", "1")
        assert "no version folder holds a model file" in a.reason
        with pytest.raises(InferenceError) as err:
            _offset(c, "a")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_a_bad_model_beside_good_ones(nets, tmp_path, caplog):
    _place(tmp_path / "good" / "1" / "model.onnx", nets[1])
    _place(tmp_path / "broken" / "1" / "model.onnx", b"not an onnx model")
    _place(tmp_path / "misconfigured" / "1" / "model.onnx", nets[1])
    _place(tmp_path / "misconfigured" / "config.toml", b"workers = 'two'\n")

    # By default (server.model_load_failure = "exit") a bad model stops the start.
    refused = pytest.raises(StartError, match=r"model 'misconfigured': .*workers: expected int")
    with refused, running_server(server_config(model_repository=str(tmp_path))):
        pass

    config = server_config(model_repository=str(tmp_path), model_watch_interval_s=HOUR_S,
                           model_load_failure="skip")
    with running_server(config) as s, Client(s.url) as c, KServeClient(s.url) as k:
        assert _offset(c, "good") == 1.0
        index = {m.name: m for m in k.repository_index()}
        assert (index["good"].state, index["broken"].state,
                index["misconfigured"].state) == ("READY", "UNAVAILABLE", "UNAVAILABLE")
        assert "broken" in index["broken"].reason
        assert (_health(s.url, "good"), _health(s.url, "broken")) == (SERVING, NOT_SERVING)
        assert "models.misconfigured.workers: expected int, got 'two'" in (
            index["misconfigured"].reason)

        # Added while running: logged, listed with its reason, the others serve on.
        _place(tmp_path / "late" / "1" / "model.onnx", b"garbage")
        caplog.set_level(logging.ERROR, logger="trtserve.service.engine")
        _check(s)
        _check(s)
        late = {m.name: m for m in c.list_models()}["late"]
        assert late.state == "UNAVAILABLE" and "late/1/model.onnx" in late.reason
        failures = lambda: [r for r in caplog.records  # noqa: E731
                            if "'late'" in r.getMessage() and "did not load" in r.getMessage()]
        assert len(failures()) == 1
        _check(s)
        _check(s)
        assert len(failures()) == 1  # retried only when its files change
        assert _offset(c, "good") == 1.0

        # Still broken, differently: the index says the latest reason, not the start's.
        _place(tmp_path / "broken" / "1" / "model.onnx", b"still not a model")
        _check(s)
        _check(s)
        assert "the model is not served" not in index["broken"].reason  # the start's
        broken = {m.name: m for m in k.repository_index()}["broken"]
        assert (broken.state, broken.version) == ("UNAVAILABLE", "")
        assert "broken/1/model.onnx" in broken.reason
        assert "the model is not served" in broken.reason  # the run-time load's

        # Fixed: each loads at its next settled change.
        _place(tmp_path / "late" / "1" / "model.onnx", nets[2])
        _place(tmp_path / "broken" / "1" / "model.onnx", nets[3])
        _place(tmp_path / "misconfigured" / "config.toml", b"workers = 1\n")
        _check(s)
        _check(s)
        assert _states(c) == {"good": ("READY", "1"), "broken": ("READY", "1"),
                              "misconfigured": ("READY", "1"), "late": ("READY", "1")}
        assert (_offset(c, "late"), _offset(c, "broken")) == (2.0, 3.0)
        _wait_for(lambda: _health(s.url, "broken") == SERVING)

        # A served model whose new version is broken: the version serving serves on.
        _place(tmp_path / "good" / "2" / "model.onnx", b"garbage")
        _check(s)
        _check(s)
        assert _states(c)["good"] == ("READY", "1") and _offset(c, "good") == 1.0


def test_entries_that_cannot_be_read_leave_the_others_and_the_watch_going(nets, tmp_path):
    """A config.toml that is not UTF-8, a version folder named '³', a symlink loop: each
    once ended the watch for good, or made the folder unreadable; now each is its own
    model's error, named, and the watch's run goes on (a real interval, no check())."""
    _place(tmp_path / "a" / "1" / "model.onnx", nets[1])
    _place(tmp_path / "latin1" / "1" / "model.onnx", nets[1])
    _place(tmp_path / "latin1" / "config.toml", b"workers = 1\n# caf\xe9\n")
    refused = pytest.raises(StartError, match=r"model 'latin1': .*latin1/config.toml: not UTF-8")
    with refused, running_server(server_config(model_repository=str(tmp_path))):
        pass

    config = server_config(model_repository=str(tmp_path), model_watch_interval_s=0.05,
                           model_load_failure="skip")
    with running_server(config) as s, Client(s.url) as c, KServeClient(s.url) as k:
        _place(tmp_path / "cubed" / "\u00b3" / "model.onnx", nets[1])
        (tmp_path / "loop").symlink_to(tmp_path / "loop")
        _wait_for(lambda: {"cubed", "loop"} <= set(_states(c)), 60)
        # Added after them: the watch still loads it.
        _place(tmp_path / "b" / "1" / "model.onnx", nets[2])
        _wait_for(lambda: _states(c).get("b") == ("READY", "1"), 60)
        assert (_offset(c, "a"), _offset(c, "b")) == (1.0, 2.0)
        index = {m.name: m for m in k.repository_index()}
        assert {name: m.state for name, m in index.items()} == {
            "a": "READY", "b": "READY", "cubed": "UNAVAILABLE", "latin1": "UNAVAILABLE",
            "loop": "UNAVAILABLE"}
        assert "latin1/config.toml: not UTF-8 text" in index["latin1"].reason
        assert "cubed: no version folder holds a model file" in index["cubed"].reason
        assert f"{tmp_path / 'loop'}: cannot tell whether" in index["loop"].reason

        # Loads by name read the folder as it is: the others load, a bad one says why.
        k.load_model("a")
        assert _offset(c, "a") == 1.0
        with pytest.raises(InferenceError) as err:
            c.load_model("latin1")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "latin1/config.toml: not UTF-8 text" in str(err.value)

        # Fixed: loaded at its next settled change, as any model.
        _place(tmp_path / "latin1" / "config.toml", b"workers = 1\n# cafe\n")
        _wait_for(lambda: _states(c).get("latin1") == ("READY", "1"), 60)


def test_explicit_load_and_unload_beside_the_folder(nets, tmp_path):
    _place(tmp_path / "a" / "1" / "model.onnx", nets[1])
    config = server_config(model_repository=str(tmp_path), model_watch_interval_s=HOUR_S)
    with running_server(config) as s, Client(s.url) as c, KServeClient(s.url) as k:
        # An unload holds until the model's files change: the watch follows changes.
        k.unload_model("a")
        _check(s)
        _check(s)
        assert _states(c)["a"] == ("UNAVAILABLE", "1")
        # A load by name reads the folder as it is now: here its new version 2.
        _place(tmp_path / "a" / "2" / "model.onnx", nets[2])
        k.load_model("a")
        assert _states(c)["a"] == ("READY", "2") and _offset(c, "a") == 2.0
        _check(s)
        _check(s)  # the watch then finds version 2 served, as loaded: a reload, same file
        assert _states(c)["a"] == ("READY", "2") and _offset(c, "a") == 2.0

        # A load naming a file serves that file, as the next version, until the folder
        # changes.
        other = tmp_path.parent / f"{tmp_path.name}-plus3.onnx"
        other.write_bytes(nets[3])
        assert c.load_model("a", str(other)).version == "3"
        _check(s)
        assert _offset(c, "a") == 3.0
        _place(tmp_path / "a" / "2" / "model.onnx", nets[1])
        _check(s)
        _check(s)
        assert _states(c)["a"] == ("READY", "2") and _offset(c, "a") == 1.0

        # A name that is nowhere: NOT_FOUND, as without a folder.
        with pytest.raises(InferenceError) as err:
            c.load_model("nowhere")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        # A model of the folder that cannot be loaded as it is: FAILED_PRECONDITION, why.
        _place(tmp_path / "b" / "config.toml", b"workers = 0\n")
        _place(tmp_path / "b" / "1" / "model.onnx", nets[1])
        with pytest.raises(InferenceError) as err:
            c.load_model("b")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "models.b.workers: got 0, expected 1..256" in str(err.value)


def test_the_folder_is_followed_with_frontend_processes(nets, tmp_path):
    """The engine process of `--frontends N` starts the watches too."""
    _place(tmp_path / "a" / "1" / "model.onnx", nets[1])
    config = server_config(model_repository=str(tmp_path), model_watch_interval_s=0.05)
    s = ServerThread(config)
    s.server = EngineServer(config, 2)
    s.start()
    try:
        _place(tmp_path / "b" / "1" / "model.onnx", nets[2])
        _wait_for(lambda: "b" in {m.name for m in s.call(s.server.engine.repository_index())
                                  if m.state == "READY"}, 60)
        with Client(s.url) as c:
            assert _offset(c, "b") == 2.0
    finally:
        s.stop()
