"""TLS, mutual TLS and bearer tokens, with real certificates made in the test."""

from __future__ import annotations

import asyncio
import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from tests.doubles.controlled import expected
from tests.reliability.certs import authority
from tests.reliability.harness import SERVING, health_status, serve_controlled
from trtserve.client import Client, InferenceError
from trtserve.client.convert import infer_request
from trtserve.client.gen.trtserve.v1 import inference_pb2 as pb
from trtserve.client.gen.trtserve.v1 import inference_pb2_grpc as pb_grpc
from trtserve.service import auth
from trtserve.service.config import TlsConfig
from trtserve.service.errors import ConfigError
from trtserve.service.server import _is_loopback
from trtserve.service.testing.servers import ServerProcess

TOKEN = "s3cret-Token_0123.~+/="
X = np.arange(16, dtype=np.float32).reshape(2, 8)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate (127.0.0.1, localhost), a client certificate, and a
    client certificate from a CA the server does not trust."""
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = authority("trtserve test CA"), authority("rogue CA")
    (d / "ca.crt").write_bytes(ca.pem)
    server_cert, server_key = ca.issue("trtserve test server", server=True).write(d, "server")
    return {
        "ca": ca.pem, "ca_file": d / "ca.crt",
        "server_cert": server_cert, "server_key": server_key,
        "client": ca.issue("client", server=False),
        "rogue_client": rogue.issue("intruder", server=False),
        "rogue_ca": rogue.pem,
    }


def tls(pki, mutual: bool = False) -> TlsConfig:
    return TlsConfig(cert_file=str(pki["server_cert"]), key_file=str(pki["server_key"]),
                     client_ca_file=str(pki["ca_file"]) if mutual else "")


def _works(client: Client) -> None:
    np.testing.assert_array_equal(client.infer("controlled", {"x": X}, timeout=10)["y"],
                                  expected(X))


def _fails(client: Client) -> InferenceError:
    with pytest.raises(InferenceError) as err:
        client.infer("controlled", {"x": X}, timeout=10)
    return err.value


# --- TLS ---------------------------------------------------------------------------


def test_tls_serves_clients_that_trust_the_ca_and_refuses_plaintext(pki):
    with serve_controlled(server={"tls": tls(pki)}) as s:
        with Client(s.url, root_certificates=pki["ca"]) as c:
            _works(c)
        port = s.server.port
        with Client(f"localhost:{port}", root_certificates=pki["ca"]) as c:
            _works(c)  # the DNS name in the certificate verifies as well
        with Client(s.url) as plaintext:
            assert _fails(plaintext).code == grpc.StatusCode.UNAVAILABLE
        with Client(s.url, root_certificates=pki["rogue_ca"]) as untrusting:
            assert _fails(untrusting).code == grpc.StatusCode.UNAVAILABLE
        with Client(s.url, root_certificates=pki["ca"]) as c:
            _works(c)  # the failed handshakes left the server serving


def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(pki):
    client, rogue = pki["client"], pki["rogue_client"]
    with serve_controlled(server={"tls": tls(pki, mutual=True)}) as s:
        with Client(s.url, root_certificates=pki["ca"]) as anonymous:
            assert _fails(anonymous).code == grpc.StatusCode.UNAVAILABLE
        with Client(s.url, root_certificates=pki["ca"], private_key=rogue.key,
                    certificate_chain=rogue.cert) as intruder:
            assert _fails(intruder).code == grpc.StatusCode.UNAVAILABLE
        with Client(s.url, root_certificates=pki["ca"], private_key=client.key,
                    certificate_chain=client.cert) as c:
            _works(c)


def test_mutual_tls_and_a_token_together(pki, tmp_path):
    client = pki["client"]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    config = {"tls": tls(pki, mutual=True), "auth_token_file": str(token_file)}
    with serve_controlled(server=config) as s:
        creds = {"root_certificates": pki["ca"], "private_key": client.key,
                 "certificate_chain": client.cert}
        with Client(s.url, **creds) as no_token:
            err = _fails(no_token)
            assert err.code == grpc.StatusCode.UNAUTHENTICATED
            assert "missing bearer token" in err.details
        with Client(s.url, token=TOKEN, **creds) as c:
            _works(c)


def test_unreadable_tls_files_are_a_config_error_naming_the_key(tmp_path):
    missing = TlsConfig(cert_file=str(tmp_path / "nope.crt"), key_file=str(tmp_path / "k"))
    with pytest.raises(ConfigError, match=r"server\.tls\.(key|cert)_file: cannot read"), \
            serve_controlled(server={"tls": missing}):
        pass


# --- bearer token --------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN)
    with serve_controlled(server={"auth_token_file": str(token_file)}) as s:
        yield s


def test_a_call_without_a_token_is_unauthenticated_and_says_why(token_server):
    with Client(token_server.url) as c:
        err = _fails(c)
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in err.details and "authorization" in err.details


@pytest.mark.parametrize("token", ["wrong", TOKEN + "x", TOKEN[:-1], ""])
def test_a_wrong_token_is_unauthenticated(token_server, token):
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(token_server.url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(infer_request("controlled", {"x": X}), metadata=metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "invalid bearer token" in err.value.details()


def test_a_token_without_the_bearer_scheme_is_unauthenticated(token_server):
    with grpc.insecure_channel(token_server.url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Infer(infer_request("controlled", {"x": X}), timeout=10,
                       metadata=(("authorization", TOKEN),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer <token>" in err.value.details()


def test_the_right_token_works_for_every_kind_of_rpc(token_server):
    with Client(token_server.url, token=TOKEN) as c:
        _works(c)
        assert c.stats("controlled").models[0].name == "controlled"
        assert c.metadata("controlled").name == "controlled"
    # The scheme is case-insensitive (RFC 7235).
    with grpc.insecure_channel(token_server.url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        answers = list(stub.InferStream(iter([infer_request("controlled", {"x": X}, None, "a")]),
                                        metadata=(("authorization", f"bearer {TOKEN}"),),
                                        timeout=10))
    assert [a.id for a in answers] == ["a"] and answers[0].WhichOneof("result") == "response"


def test_every_kind_of_rpc_is_refused_without_a_token(token_server):
    """Unary, stream-stream: each is answered UNAUTHENTICATED (not UNKNOWN or a hang)."""
    with grpc.insecure_channel(token_server.url) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.InferStream(iter([infer_request("controlled", {"x": X})]), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            stub.Stats(pb.StatsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for version in ("v1", "v1alpha"):  # reflection, both versions
            reflect = channel.stream_stream(
                f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            with pytest.raises(grpc.RpcError) as err:
                list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                             timeout=10))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, version


def test_calls_without_a_token_are_refused_before_their_message_comes(token_server):
    """A call refused for its token is answered from its headers: it never waits for its
    request message. Before, a unary call that sent headers and then nothing stayed open
    (holding about 20 KB of the server's memory) until the client went away."""

    async def never_sent():
        await asyncio.Event().wait()
        yield b""  # pragma: no cover - never reached

    async def refused() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(token_server.url) as channel:
            # The unary Infer and Stats methods, called as streams that never send.
            calls = [channel.stream_unary(f"/trtserve.v1.InferenceService/{m}")(
                never_sent(), timeout=10) for m in ("Infer", "Stats") for _ in range(50)]
            codes = []
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                codes.append(err.value.code())
            return codes

    assert set(asyncio.run(refused())) == {grpc.StatusCode.UNAUTHENTICATED}


def test_health_is_open_by_default(token_server):
    with grpc.insecure_channel(token_server.url) as channel:
        assert health_status(channel, "") == SERVING
        assert health_status(channel, "controlled") == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="controlled"), timeout=10)
        assert next(watch).status == SERVING
        watch.cancel()


def test_health_can_require_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    config = {"auth_token_file": str(token_file), "health_requires_auth": True}
    with serve_controlled(server=config) as s, grpc.insecure_channel(s.url) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_status(channel, "")
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Watch is unary-stream: the refusal must match that kind, or grpc answers UNKNOWN.
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(watch)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in err.value.details()
        assert health_status(channel, "", (("authorization", f"Bearer {TOKEN}"),)) == SERVING


def test_the_token_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(auth.TOKEN_ENV, "from-env")
    with serve_controlled() as s:
        with Client(s.url) as c:
            assert _fails(c).code == grpc.StatusCode.UNAUTHENTICATED
        with Client(s.url, token="from-env") as c:
            _works(c)


def test_the_token_file_wins_over_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(auth.TOKEN_ENV, "from-env")
    (tmp_path / "token").write_text("  from-file\n")
    assert auth.load_token(str(tmp_path / "token")) == "from-file"
    monkeypatch.delenv(auth.TOKEN_ENV)
    assert auth.load_token("") is None


def test_an_empty_or_missing_token_file_is_refused(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        auth.load_token(str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="cannot read"):
        auth.load_token(str(tmp_path / "absent"))
    (tmp_path / "spaced").write_text("two words")
    with pytest.raises(ConfigError, match="printable ASCII"):
        auth.load_token(str(tmp_path / "spaced"))


def test_a_token_no_client_could_send_is_refused(monkeypatch):
    monkeypatch.setenv(auth.TOKEN_ENV, "caf\u00e9")
    with pytest.raises(ConfigError, match=f"{auth.TOKEN_ENV}: the token must be printable"):
        auth.load_token("")


def test_the_token_itself_cannot_be_given_on_the_command_line(capsys):
    from trtserve.service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "m=x.onnx", "--auth-token", "visible-in-ps"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["env", "file"])
def test_the_cli_server_takes_its_token_from_env_or_file(example_onnx, tmp_path, source):
    secret = f"cli-{source}-token"
    args, env = ["--model", f"example={example_onnx}", "--workers", "1"], {}
    if source == "env":
        env[auth.TOKEN_ENV] = secret
    else:
        (tmp_path / "token").write_text(secret)
        args += ["--auth-token-file", str(tmp_path / "token")]
    server = ServerProcess(args, env=env)
    try:
        server.wait_ready()  # health is open without the token
        x = np.zeros((1, 64), np.float32)
        with Client(server.url) as c, pytest.raises(InferenceError) as err:
            c.infer("example", {"input": x}, timeout=10)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.url, token=secret) as c:
            assert c.infer("example", {"input": x}, timeout=10)["output"].shape == (1, 16)
    finally:
        rc, log = server.terminate()
    assert rc == 0, log
    assert secret not in " ".join(server.proc.args) and secret not in log


# --- exposure warning ------------------------------------------------------------------


def test_binding_beyond_loopback_without_tls_or_token_warns(caplog):
    assert _is_loopback("127.0.0.1") and _is_loopback("127.0.0.2") and _is_loopback("::1")
    assert _is_loopback("localhost") and not _is_loopback("0.0.0.0")
    with caplog.at_level(logging.WARNING, logger="trtserve.service.server"), \
            serve_controlled(server={"host": "0.0.0.0"}):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("without TLS" in w for w in warnings), warnings
    assert any("without an auth token" in w for w in warnings), warnings


def test_binding_loopback_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="trtserve.service.server"), serve_controlled():
        pass
    assert not [r for r in caplog.records if "without" in r.getMessage()]
