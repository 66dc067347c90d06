"""One Endpoint builds every client's channel: TLS and the token reach the server
the same way from Client, AsyncClient, KServeClient and the load generator."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest

from tests.doubles.controlled import expected
from tests.reliability.certs import authority
from tests.reliability.harness import serve_controlled
from trtserve.client import AsyncClient, Client, InferenceError, KServeClient
from trtserve.client.bench.config import BenchConfig, Level
from trtserve.client.bench.requests import prepare, server_batches
from trtserve.client.channels import Endpoint
from trtserve.service.config import TlsConfig

TOKEN = "channel-token"
X = np.arange(16, dtype=np.float32).reshape(2, 8)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """A server on TLS that wants a bearer token; and its CA."""
    d = tmp_path_factory.mktemp("pki")
    ca = authority("channels test CA")
    cert, key = ca.issue("trtserve test server", server=True).write(d, "server")
    (d / "token").write_text(TOKEN)
    config = {"tls": TlsConfig(cert_file=str(cert), key_file=str(key)),
              "auth_token_file": str(d / "token")}
    with serve_controlled(server=config) as s:
        yield s, ca.pem


def test_blocking_clients_carry_tls_and_the_token(served):
    s, ca = served
    with Client(s.url, root_certificates=ca, token=TOKEN) as c:
        np.testing.assert_array_equal(c.infer("controlled", {"x": X}, timeout=10)["y"],
                                      expected(X))
    with KServeClient(s.url, root_certificates=ca, token=TOKEN) as k:
        assert k.model_ready("controlled", timeout=10)
    with Client(s.url, root_certificates=ca) as anonymous, \
            pytest.raises(InferenceError) as refused:
        anonymous.infer("controlled", {"x": X}, timeout=10)
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_asyncio_client_carries_tls_and_the_token(served):
    s, ca = served

    async def call(token: str | None) -> np.ndarray:
        async with AsyncClient(s.url, root_certificates=ca, token=token) as c:
            return (await c.infer("controlled", {"x": X}, timeout=10))["y"]

    np.testing.assert_array_equal(asyncio.run(call(TOKEN)), expected(X))
    with pytest.raises(InferenceError) as refused:
        asyncio.run(call(None))
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_load_generator_carries_tls_and_the_token(served):
    s, ca = served
    config = BenchConfig(url=s.url, model="controlled", levels=(Level("closed", 1),),
                         shapes=(("x", (2, 8)),), token=TOKEN, root_certificates=ca)
    assert len(prepare(config, variants=2)) == 2  # its probe call was answered
    assert server_batches(config) is not None
    anonymous = dataclasses.replace(config, token=None)
    with pytest.raises(grpc.RpcError) as refused:
        prepare(anonymous, variants=1)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_is_on_with_any_certificate_given():
    assert not Endpoint("h:1").secure
    assert Endpoint("h:1", tls=True).secure
    assert Endpoint("h:1", root_certificates=b"pem").secure
    assert Endpoint("h:1", token="t").metadata() == (("authorization", "Bearer t"),)
    assert Endpoint("h:1").metadata() is None
