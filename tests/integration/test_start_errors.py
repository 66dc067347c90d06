"""`trtserve serve` that cannot start: one line naming what to fix, exit code 2, no traceback.

Every test runs the real command line in a subprocess, as an operator would.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from tests.reliability.certs import authority
from tests.reliability.harness import NOT_SERVING, SERVING, health_status
from trtserve.client import Client, InferenceError
from trtserve.client.client import KServeClient
from trtserve.service import auth
from trtserve.service.backends.tensorrt.api import gpu_present
from trtserve.service.errors import ConfigError
from trtserve.service.testing.servers import ROOT, ServerProcess, free_port

NO_TENSORRT = ROOT / "tests" / "doubles" / "no_tensorrt"
X = np.zeros((2, 64), np.float32)


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`trtserve serve ARGS` on a free port, expected to exit by itself."""
    return subprocess.run(
        [sys.executable, "-m", "trtserve.service.cli", "serve", "--port", "0",
         "--metrics-port", "0", "--http-port", "0", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})})


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one `trtserve:` line of a refused start (exit 2, no traceback, never serving)."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    assert not re.search(r"serving \d+ model", output), output
    assert "listening on" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.startswith("trtserve:")]
    assert len(lines) == 1, output
    return lines[0]


# --- models ------------------------------------------------------------------------


def test_a_missing_model_file_names_the_model_the_file_and_the_key(tmp_path):
    line = refusal(serve("--model", f"resnet={tmp_path / 'absent.onnx'}"))
    assert "model 'resnet'" in line and "absent.onnx" in line
    assert "file not found" in line and "models.resnet.path" in line


def test_a_file_that_is_not_onnx_says_so(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a protobuf\xff" * 10)
    line = refusal(serve("--model", f"m={bad}"))
    assert "model 'm'" in line and str(bad) in line and "not an ONNX model" in line


@pytest.mark.skipif(gpu_present(), reason="this machine has a GPU")
def test_an_engine_on_a_machine_without_a_gpu_says_a_gpu_is_needed(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"an engine")
    line = refusal(serve("--model", f"m={engine}"))
    assert "model 'm'" in line and "needs an NVIDIA GPU" in line and "onnxruntime" in line


def test_an_engine_without_tensorrt_says_how_to_install_it(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"an engine")
    hidden = {"PYTHONPATH": os.pathsep.join(
        p for p in (str(NO_TENSORRT), os.environ.get("PYTHONPATH", "")) if p)}
    line = refusal(serve("--model", f"m={engine}", env=hidden))
    assert "model 'm'" in line and "TensorRT, which is not installed" in line
    assert "pip install 'trtserve[tensorrt]'" in line


@pytest.mark.parametrize("table, missing", [
    ('name = "m"\n', "['path']"), ('path = "m.onnx"\n', "['name']"), ("workers = 1\n",
                                                                       "['name', 'path']")])
def test_a_models_table_without_name_or_path_names_the_missing_key(tmp_path, table, missing):
    config = tmp_path / "c.toml"
    config.write_text("[[models]]\n" + table)
    line = refusal(serve("--config", str(config)))
    assert line == f"trtserve: configuration error: models[0]: missing required key(s) {missing}"


def test_preferred_batch_sizes_above_the_max_batch_are_refused(example_onnx):
    line = refusal(serve("--model", f"m={example_onnx}", "--max-batch-size", "8",
                         "--preferred-batch-sizes", "4,16"))
    assert "models.m.preferred_batch_sizes: got [4, 16]" in line and "(8)" in line
    # Without --max-batch-size: against the model's own maximum (64 for this ONNX model).
    line = refusal(serve("--model", f"m={example_onnx}", "--preferred-batch-sizes", "100"))
    assert "models.m.preferred_batch_sizes" in line and "max batch size of 64" in line


# --- TLS and the token -------------------------------------------------------------------


@pytest.fixture(scope="module")
def pem(tmp_path_factory):
    d = tmp_path_factory.mktemp("pem")
    ca = authority("start test CA")
    cert, key = ca.issue("server", server=True).write(d, "server")
    _, other_key = ca.issue("other", server=True).write(d, "other")
    (d / "ca.crt").write_bytes(ca.pem)
    (d / "not-pem.crt").write_bytes(b"\x30\x82 DER-ish bytes, not PEM")
    return {"cert": cert, "key": key, "other_key": other_key, "ca": d / "ca.crt",
            "not_pem": d / "not-pem.crt"}


@pytest.mark.parametrize("case, expected", [
    ("swapped", "server.tls.cert_file: {key} holds no PEM certificate (it holds a private "
                "key: are cert_file and key_file swapped?)"),
    ("mismatched", "server.tls.key_file: {other_key} is not the key of the certificate in "
                   "{cert}"),
    ("ca_not_pem", "server.tls.client_ca_file: {not_pem} holds no PEM certificate"),
])
def test_bad_tls_files_are_named_before_anything_binds(example_onnx, pem, case, expected):
    cert, key, ca = pem["cert"], pem["key"], pem["ca"]
    if case == "swapped":
        cert, key = key, cert
    elif case == "mismatched":
        key = pem["other_key"]
    else:
        ca = pem["not_pem"]
    line = refusal(serve("--model", f"m={example_onnx}", "--tls-cert", str(cert),
                         "--tls-key", str(key), "--tls-client-ca", str(ca)))
    assert line == "trtserve: configuration error: " + expected.format(**pem)


@pytest.mark.parametrize("blank", [" ", "\n", "\t \n", ""])
def test_a_set_but_blank_token_refuses_to_start(example_onnx, monkeypatch, blank):
    monkeypatch.setenv(auth.TOKEN_ENV, blank)
    with pytest.raises(ConfigError, match=f"{auth.TOKEN_ENV} is set but blank"):
        auth.load_token("")
    if blank == " ":  # the command line as well, once
        line = refusal(serve("--model", f"m={example_onnx}", env={auth.TOKEN_ENV: blank}))
        assert f"{auth.TOKEN_ENV} is set but blank" in line


# --- ports ------------------------------------------------------------------------------


def test_a_second_server_on_a_held_port_is_refused_and_the_first_keeps_all_traffic(
        example_onnx):
    first = ServerProcess(["--model", f"m={example_onnx}", "--workers", "1"])
    try:
        first.wait_ready()
        second = subprocess.run(
            [sys.executable, "-m", "trtserve.service.cli", "serve", "--model", f"m={example_onnx}",
             "--workers", "1", "--port", str(first.port), "--metrics-port", "0",
             "--http-port", "0"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        line = refusal(second)
        assert f"server.port: 127.0.0.1:{first.port} is in use by another process" in line
        calls = 20
        for _ in range(calls):  # each call on a fresh connection: the kernel picks a listener
            with Client(first.url) as c:
                c.infer("m", {"input": X}, timeout=30)
        with Client(first.url) as c:
            assert c.stats("m").models[0].requests == calls
    finally:
        code, output = first.terminate()
    assert code == 0, output


def test_a_held_metrics_port_is_refused_with_one_line(example_onnx):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = refusal(serve("--model", f"m={example_onnx}", "--metrics-port", str(port)))
    assert f"server.metrics_port: 127.0.0.1:{port} is in use by another process" in line


# --- order, and serving the rest ---------------------------------------------------------


def test_serving_is_logged_only_once_the_models_are_loaded(example_onnx):
    server = ServerProcess(["--model", f"m={example_onnx}", "--workers", "1"])
    try:
        server.wait_ready()
    finally:
        code, output = server.terminate()
    assert code == 0, output
    assert "listening on" not in output
    assert output.index("model 'm' ready") < output.index(f"serving 1 model(s) on 127.0.0.1:"
                                                          f"{server.port}")


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_skip_serves_the_models_that_load_and_reports_the_others(example_onnx, tmp_path,
                                                                 frontends):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"garbage")
    server = ServerProcess(["--model", f"good={example_onnx}", "--model", f"broken={bad}",
                            "--model", f"gone={tmp_path / 'absent.onnx'}", "--workers", "1",
                            "--model-load-failure", "skip", "--frontends", frontends])
    try:
        server.wait_ready()
        with grpc.insecure_channel(server.url) as channel:
            assert health_status(channel, "good") == SERVING
            assert health_status(channel, "broken") == NOT_SERVING
            assert health_status(channel, "gone") == NOT_SERVING
        with Client(server.url) as c:
            assert c.infer("good", {"input": X}, timeout=30)["output"].shape == (2, 16)
            with pytest.raises(InferenceError) as err:
                c.infer("broken", {"input": X}, timeout=30)
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert "failed to load when the server started" in err.value.details
        assert str(bad) not in err.value.details  # the reason is for the log, not clients
        with KServeClient(server.url) as k:
            assert k.ready() and k.model_ready("good") and not k.model_ready("broken")
    finally:
        code, output = server.terminate()
    assert code == 0, output
    assert f"model 'broken' skipped (server.model_load_failure = \"skip\"): model 'broken' " \
           f"({bad}): ONNX Runtime cannot load it" in output
    assert "model 'gone' skipped" in output and "file not found" in output


def test_exit_is_the_default_and_names_the_model_that_failed(example_onnx, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"garbage")
    line = refusal(serve("--model", f"good={example_onnx}", "--model", f"broken={bad}"))
    assert "model 'broken'" in line


def test_skip_with_no_model_left_is_refused(tmp_path):
    line = refusal(serve("--model", f"gone={tmp_path / 'absent.onnx'}",
                         "--model-load-failure", "skip"))
    assert "no model could be loaded" in line


# --- the small ones -----------------------------------------------------------------------


def _client(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trtserve.client.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kwargs)  # type: ignore[call-overload]


def test_both_commands_print_their_version():
    for module, prog in (("trtserve.service.cli", "trtserve"),
                         ("trtserve.client.cli", "trtserve-client")):
        result = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{prog} ") and len(result.stdout.split()) == 2


@pytest.fixture(scope="module")
def served(example_onnx):
    server = ServerProcess(["--model", f"example={example_onnx}", "--workers", "1"])
    server.wait_ready()
    yield server
    server.terminate()


def test_health_of_an_unknown_service_says_what_is_unknown(served):
    result = _client("--url", served.url, "health", "--service", "nosuch")
    assert result.returncode == 1
    assert "NOT_FOUND" in result.stderr and "'nosuch'" in result.stderr


def test_infer_into_a_closed_pipe_exits_quietly(served):
    proc = subprocess.Popen(
        [sys.executable, "-m", "trtserve.client.cli", "--url", served.url, "infer", "--model",
         "example", "--rows", "8", "--json"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line is written, as `| head -0`
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + 13, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr


def test_make_help_shows_the_port_it_will_use():
    result = subprocess.run(["make", "-s", "help", "PORT=9123"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "on port 9123" in result.stdout and "$(PORT)" not in result.stdout


def test_ports_check_free_refuses_a_listening_port_and_allows_port_zero():
    from trtserve.service.errors import PortInUse
    from trtserve.service.ports import check_free

    check_free("127.0.0.1", 0, "server.port")
    port = free_port()
    check_free("127.0.0.1", port, "server.port")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        with pytest.raises(PortInUse, match=rf"server\.port: 127\.0\.0\.1:{port} is in use"):
            check_free("127.0.0.1", port, "server.port")
        # What gRPC's default SO_REUSEPORT would have let through: the holder shares with nobody.
        with pytest.raises(PortInUse):
            check_free("0.0.0.0", port, "server.port")



async def test_our_listener_does_not_share_its_port_even_with_a_reuseport_socket():
    """The second line of defence, for a port taken between the probe and the bind:
    with `ports.GRPC_OPTIONS` gRPC refuses a port whose holder set SO_REUSEPORT
    (as every gRPC server does by default), where gRPC's default would share it."""
    from trtserve.service.ports import GRPC_OPTIONS

    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        address = f"127.0.0.1:{holder.getsockname()[1]}"
        shared = grpc.aio.server()
        assert shared.add_insecure_port(address)  # what a second server did before
        await shared.stop(None)
        ours = grpc.aio.server(options=list(GRPC_OPTIONS))
        with pytest.raises(RuntimeError, match="Failed to bind"):
            ours.add_insecure_port(address)
        await ours.stop(None)


def test_an_encrypted_key_is_refused_without_prompting(pem, tmp_path):
    from cryptography.hazmat.primitives import serialization

    from trtserve.service import tls
    from trtserve.service.config import TlsConfig

    key = serialization.load_pem_private_key(pem["key"].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    with pytest.raises(ConfigError, match=rf"server\.tls\.key_file: {encrypted} is encrypted"):
        tls.check(TlsConfig(cert_file=str(pem["cert"]), key_file=str(encrypted)))
    tls.check(TlsConfig(cert_file=str(pem["cert"]), key_file=str(pem["key"]),
                        client_ca_file=str(pem["ca"])))  # the good set passes


def test_a_held_http_port_is_refused_with_one_line(example_onnx):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = refusal(serve("--model", f"m={example_onnx}", "--http-port", str(port)))
    assert f"server.http_port: 127.0.0.1:{port} is in use by another process" in line


def test_the_http_port_cannot_be_another_port_of_the_server():
    from trtserve.service.config import ServerConfig

    with pytest.raises(ConfigError, match=r"server\.http_port: got 9000, expected a port "
                       r"other than server\.port \(9000\)"):
        ServerConfig(port=9000, http_port=9000)
    with pytest.raises(ConfigError, match=r"server\.http_port: got 9002"):
        ServerConfig(port=9001, metrics_port=9002, http_port=9002)
    with pytest.raises(ConfigError, match=r"server\.http_port: got 70000"):
        ServerConfig(http_port=70000)
    ServerConfig(port=9001, metrics_port=0, http_port=0)


def test_the_metrics_port_cannot_be_the_grpc_port():
    from trtserve.service.config import ServerConfig

    with pytest.raises(ConfigError, match=r"server\.metrics_port: got 9000, expected a port "
                                          r"other than server\.port \(9000\)"):
        ServerConfig(port=9000, metrics_port=9000)
    ServerConfig(port=0, metrics_port=0)


def test_debug_adds_the_traceback_to_the_one_line(tmp_path):
    result = serve("--model", f"m={tmp_path / 'absent.onnx'}", "--log-level", "debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ModelLoadError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("trtserve: cannot start: model 'm'")


def test_client_file_errors_are_one_line(served, tmp_path):
    result = _client("--url", served.url, "--token-file", str(tmp_path / "absent"), "health")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == \
        f"trtserve-client: {tmp_path / 'absent'}: No such file or directory"


def test_a_reservation_takes_a_port_in_time_wait_and_refuses_a_listening_one():
    """The engine's reservation of the port for its frontends. A connection of the last
    server on the port, closed by that server, stays in TIME_WAIT for a minute: a
    restart with frontends was refused meanwhile (found by an adversarial run: one
    frontend, stopped after an HTTP request, then two)."""
    from trtserve.service.errors import PortInUse
    from trtserve.service.ports import reserve

    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"server\.http_port: cannot bind 127\.0\.0\.1:{port}"):
            reserve("127.0.0.1", port, "server.http_port")
        client = socket.create_connection(("127.0.0.1", port))
        served, _ = listener.accept()
        served.close()  # the server closes first: its side ends in TIME_WAIT
        client.recv(1)
        client.close()
    time.sleep(0.1)
    held = reserve("127.0.0.1", port, "server.http_port")
    assert [s.getsockname()[1] for s in held] == [port]
    for s in held:
        s.close()
