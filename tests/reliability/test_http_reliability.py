"""KServe v2 over HTTP under the same rules as gRPC: bearer token, TLS and mutual TLS, a
full queue (429), deadlines (504), a failed batch (500, nothing leaked), a drain (503).

The controlled double (tests/doubles/controlled.py) holds or fails batches on command,
so every case is made by extreme settings and gates, never by timing.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import threading
from typing import Any

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.doubles.controlled import SECRET, expected
from tests.frontends.test_kserve_http import Answer, http
from tests.reliability.certs import authority
from tests.reliability.harness import eventually, model_stats, serve_controlled, wait_for
from trtserve.service.config import TlsConfig
from trtserve.service.testing.servers import free_port

TOKEN = "s3cret-Token_0123.~+/="


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, a server certificate (127.0.0.1, localhost), client certificates from it
    and from a CA the server does not trust."""
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = authority("trtserve test CA"), authority("rogue CA")
    (d / "ca.crt").write_bytes(ca.pem)
    server_cert, server_key = ca.issue("trtserve test server", server=True).write(d, "server")
    return {"ca": ca.pem, "ca_file": d / "ca.crt", "server_cert": server_cert,
            "server_key": server_key, "client": ca.issue("client", server=False),
            "rogue_client": rogue.issue("intruder", server=False), "rogue_ca": rogue.pem}


def tls(pki: dict[str, Any], mutual: bool = False) -> TlsConfig:
    return TlsConfig(cert_file=str(pki["server_cert"]), key_file=str(pki["server_key"]),
                     client_ca_file=str(pki["ca_file"]) if mutual else "")


def x_of(rows: int, start: float = 0.0) -> np.ndarray:
    return (start + np.arange(rows * 8, dtype=np.float32)).reshape(rows, 8)


def body(x: np.ndarray, **parameters: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}], "parameters": parameters}


def answer_y(answer: Answer) -> np.ndarray:
    assert answer.status == 200, (answer.status, answer.body)
    (out,) = answer.json()["outputs"]
    return np.array(out["data"], np.float32).reshape(out["shape"])


def error_of(answer: Answer) -> str:
    return json.loads(answer.body)["error"]


def http_url(s: Any) -> str:
    return f"127.0.0.1:{s.server.server.http_port}"


def serve(server: dict[str, Any] | None = None, **model: Any) -> Any:
    return serve_controlled(server={"http_port": free_port(), **(server or {})}, **model)


# --- auth ------------------------------------------------------------------------------


def test_the_bearer_token_guards_every_endpoint_but_health(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    x = x_of(2)
    with serve({"auth_token_file": str(token_file)}) as s:
        url = http_url(s)
        for path, data in (("/v2/models/controlled/infer", body(x)), ("/v2", None),
                           ("/v2/models/controlled", None), ("/v2/models/stats", None)):
            missing = http(url, path, data)
            assert missing.status == 401 and "missing bearer token" in error_of(missing)
            assert missing.headers["WWW-Authenticate"] == "Bearer"
            wrong = http(url, path, data, headers={"Authorization": "Bearer nope"})
            assert wrong.status == 401 and "invalid bearer token" in error_of(wrong)
            basic = http(url, path, data, headers={"Authorization": "Basic abc"})
            assert basic.status == 401 and "must be 'Bearer <token>'" in error_of(basic)
            good = http(url, path, data, headers={"Authorization": f"Bearer {TOKEN}"})
            assert good.status == 200, good.body
        # Orchestrators probe health without the secret (server.health_requires_auth off).
        assert http(url, "/v2/health/ready").status == 200
        assert http(url, "/v2/health/live").status == 200
        # tritonclient.http sends the token as a header.
        client = httpclient.InferenceServerClient(url)
        tensor = httpclient.InferInput("x", [2, 8], "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("controlled", [tensor],
                              headers={"Authorization": f"Bearer {TOKEN}"})
        np.testing.assert_array_equal(result.as_numpy("y"), expected(x))
        with pytest.raises(InferenceServerException) as err:
            client.infer("controlled", [tensor])
        assert err.value.status() == "401"
        client.close()
        assert s.controls.snapshot()[0] == 4  # only the two authorised requests ran


def test_health_needs_the_token_when_configured(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with serve({"auth_token_file": str(token_file), "health_requires_auth": True}) as s:
        url = http_url(s)
        assert http(url, "/v2/health/ready").status == 401
        assert http(url, "/v2/health/ready",
                    headers={"Authorization": f"Bearer {TOKEN}"}).status == 200


# --- TLS -------------------------------------------------------------------------------


def _client_context(pki: dict[str, Any], certificate: Any = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=pki["ca"].decode())
    if certificate is not None:
        cert, key = certificate
        context.load_cert_chain(cert, key)
    return context


def test_tls_serves_https_and_refuses_plain_http(pki):
    x = x_of(1)
    with serve({"tls": tls(pki)}) as s:
        port = s.server.server.http_port
        for host in ("127.0.0.1", "localhost"):
            answer = http(f"{host}:{port}", "/v2/models/controlled/infer", body(x),
                          context=_client_context(pki), scheme="https")
            np.testing.assert_array_equal(answer_y(answer), expected(x))
        with pytest.raises(OSError):
            http(f"127.0.0.1:{port}", "/v2/health/live")  # plain HTTP to a TLS port
        rogue = ssl.create_default_context(cadata=pki["rogue_ca"].decode())
        with pytest.raises(OSError):
            http(f"127.0.0.1:{port}", "/v2/health/live", context=rogue, scheme="https")
        # tritonclient.http over TLS, trusting the test CA.
        client = httpclient.InferenceServerClient(
            f"127.0.0.1:{port}", ssl=True, ssl_options={"ca_certs": str(pki["ca_file"])},
            insecure=False)
        assert client.is_server_ready()
        client.close()


def test_mutual_tls_needs_a_client_certificate_from_the_configured_ca(pki, tmp_path):
    good = pki["client"].write(tmp_path, "client")
    rogue = pki["rogue_client"].write(tmp_path, "rogue")
    with serve({"tls": tls(pki, mutual=True)}) as s:
        url = f"127.0.0.1:{s.server.server.http_port}"
        answer = http(url, "/v2/health/ready", context=_client_context(pki, good),
                      scheme="https")
        assert answer.status == 200
        for context in (_client_context(pki), _client_context(pki, rogue)):
            with pytest.raises(OSError):
                http(url, "/v2/health/ready", context=context, scheme="https")


# --- queue, deadlines, failures, drain -----------------------------------------------


async def _post(url: str, data: dict[str, Any]) -> Answer:
    return await asyncio.to_thread(http, url, "/v2/models/controlled/infer", data)


def test_a_full_queue_is_429_and_accepted_requests_are_answered():
    # One worker, one request per batch: while the worker is held, one request runs,
    # one waits in the batch being formed, and one fills the queue.
    with serve_controlled(server={"http_port": free_port()}, max_batch_size=1,
                          max_queue_size=1) as s:
        url = http_url(s)
        s.controls.hold()

        async def scenario() -> tuple[list[Answer], Answer]:
            accepted = [asyncio.create_task(_post(url, body(x_of(1, 0))))]
            await asyncio.to_thread(s.controls.started.wait, 10)
            for i in (1, 2):
                accepted.append(asyncio.create_task(_post(url, body(x_of(1, i)))))
                await asyncio.to_thread(wait_for,
                                        lambda n=i: model_stats(s.url).requests == n + 1)
            refused = await _post(url, body(x_of(1, 10)))
            s.controls.release()
            return list(await asyncio.gather(*accepted)), refused

        answered, refused = asyncio.run(scenario())
        assert refused.status == 429, refused.body
        assert "queue is full" in error_of(refused)
        for i, answer in enumerate(answered):
            np.testing.assert_array_equal(answer_y(answer), expected(x_of(1, i)))


def test_the_engines_input_bounds_and_byte_budget_hold_over_http():
    # 2 rows of 8 FP32 are 64 bytes: within the 64-byte input bound; 3 rows are not.
    with serve({"max_request_bytes_in_flight": 100}, max_input_bytes=64, max_batch_size=4) as s:
        url = http_url(s)
        too_big = http(url, "/v2/models/controlled/infer", body(x_of(3)))
        assert too_big.status == 400 and "tensor 'x'" in error_of(too_big)
        assert "max_input_bytes" in error_of(too_big)
        s.controls.hold()
        holder = threading.Thread(target=http, args=(url, "/v2/models/controlled/infer",
                                                     body(x_of(2))))
        holder.start()
        assert s.controls.started.wait(10)
        # 64 bytes held; 64 more would pass the 100-byte budget.
        over = http(url, "/v2/models/controlled/infer", body(x_of(2, 1)))
        s.controls.release()
        holder.join(30)
        assert over.status == 429 and "too many request bytes in flight" in error_of(over)
        np.testing.assert_array_equal(
            answer_y(http(url, "/v2/models/controlled/infer", body(x_of(2)))),
            expected(x_of(2)))


def test_a_timeout_that_passes_in_the_queue_is_504_and_never_runs():
    with serve(max_batch_size=1) as s:
        url = http_url(s)
        s.controls.hold()
        holder = threading.Thread(target=http, args=(url, "/v2/models/controlled/infer",
                                                     body(x_of(1, 0))))
        holder.start()
        assert s.controls.started.wait(10)
        # 1 ms to start running while the only worker is held: it cannot. It fails
        # when the worker frees up (as KServe's gRPC `timeout` does), unexecuted.
        answers: list[Answer] = []
        late_thread = threading.Thread(target=lambda: answers.append(http(
            url, "/v2/models/controlled/infer", body(x_of(1, 50), timeout=1000))))
        late_thread.start()
        wait_for(lambda: model_stats(s.url).requests == 2)
        s.controls.release()
        holder.join(30)
        late_thread.join(30)
        (late,) = answers
        assert late.status == 504, late.body
        assert "deadline" in error_of(late).lower()
        assert s.controls.snapshot()[0] == 1  # the late request never ran


def test_a_client_that_hangs_up_cancels_its_request_before_it_runs():
    with serve(max_batch_size=1) as s:
        url = http_url(s)
        port = s.server.server.http_port
        s.controls.hold()
        holder = threading.Thread(target=http, args=(url, "/v2/models/controlled/infer",
                                                     body(x_of(1, 0))))
        holder.start()
        assert s.controls.started.wait(10)
        payload = json.dumps(body(x_of(1, 60))).encode()
        with socket.create_connection(("127.0.0.1", port)) as gone:
            gone.sendall(b"POST /v2/models/controlled/infer HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\n"
                         b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" +
                         payload)
            wait_for(lambda: model_stats(s.url).requests == 2)
        # The connection is closed with the request queued behind the held batch.
        wait_for(lambda: model_stats(s.url).cancelled == 1)
        s.controls.release()
        holder.join(30)
        assert s.controls.snapshot()[0] == 1  # the abandoned request never ran


def test_a_failed_batch_is_500_with_a_generic_message_and_the_next_is_served():
    with serve() as s:
        url = http_url(s)
        s.controls.fail_next_batches(1)
        failed = http(url, "/v2/models/controlled/infer", body(x_of(2)))
        assert failed.status == 500, failed.body
        assert SECRET not in failed.body.decode()
        np.testing.assert_array_equal(
            answer_y(http(url, "/v2/models/controlled/infer", body(x_of(2)))),
            expected(x_of(2)))


def test_draining_answers_accepted_work_and_reports_not_ready():
    with serve(max_batch_size=1) as s:
        url = http_url(s)
        s.controls.hold()
        accepted: list[Answer] = []
        holder = threading.Thread(target=lambda: accepted.append(
            http(url, "/v2/models/controlled/infer", body(x_of(1, 3)))))
        holder.start()
        assert s.controls.started.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(s.server.server.stop(), s.server.loop)
        assert eventually(lambda: http(url, "/v2/health/ready").status == 400)
        refused = http(url, "/v2/models/controlled/infer", body(x_of(1)))
        assert refused.status == 503, refused.body
        s.controls.release()
        stopping.result(30)
        holder.join(30)
        np.testing.assert_array_equal(answer_y(accepted[0]), expected(x_of(1, 3)))
