"""Connections that never send a request cannot keep other clients out.

Each connection holds a file descriptor. A server that kept the usual soft limit of
1,024 open files stopped accepting anyone's connections once a client held about a
thousand idle ones (every other client's call: DEADLINE_EXCEEDED); `trtserve
serve` now raises the soft limit to the hard one at start, in every process, and
closes a connection that has not finished its handshake within
`grpc_handshake_timeout_s`. Connections may also be closed when idle, or told to go
when old (`grpc_max_connection_idle_s`, `grpc_max_connection_age_s`). Each process
holds at most `grpc_max_connections` connections (one more is closed as it opens) and
serves at most `max_calls_in_flight` calls (one more is RESOURCE_EXHAUSTED), so calls
that never send their message cannot pile up. Real servers (`trtserve serve` as a child
process, one process and two frontends), real sockets. HTTP/2 floods on one connection:
test_http2_floods.py.
"""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks import h2_frames
from trtserve.client import Client, InferenceError
from trtserve.service import open_files
from trtserve.service.config import ServerConfig
from trtserve.service.errors import ConfigError
from trtserve.service.testing.servers import ServerProcess

# A finished handshake: HTTP/2's client preface and an empty SETTINGS frame.
PREFACE = h2_frames.CLIENT_START


def _limit(soft: int, hard: int) -> Callable[[], None]:
    """Run in the server's child before Python starts: the limits it inherits."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def _idle_connections(port: int, count: int,
                      data: bytes = PREFACE) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            if data:
                s.sendall(data)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def _served(url: str) -> None:
    with Client(url) as c:
        _served_by(c)


def _served_by(client: Client) -> None:
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    y = client.infer("example", {"input": x}, timeout=10)["output"]
    assert y.shape == (2, 16)


def _processes(server: ServerProcess) -> list[psutil.Process]:
    main = psutil.Process(server.proc.pid)
    return [main, *main.children()]


@pytest.fixture(scope="module", autouse=True)
def room_for_the_test() -> None:
    """The test itself opens hundreds of sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2048:
        pytest.skip("this process may open fewer than 2,048 files")


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_more_idle_connections_than_the_soft_limit_keep_no_client_out(
        example_onnx: Path, frontends: str) -> None:
    """Started with a soft limit of 256 (hard 4,096), the server holds 600 idle
    connections and still serves a new client: the limit was raised in every process."""
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", frontends],
                           preexec=_limit(256, 4096))
    with server.serving():
        processes = _processes(server)
        assert len(processes) == (1 if frontends == "1" else 3)  # the engine + 2 frontends
        assert all(p.rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096) for p in processes)
        with _idle_connections(server.port, 600):
            time.sleep(0.5)  # the server has accepted them
            assert sum(p.num_fds() for p in processes) > 600
            _served(server.url)
        assert "open-file limit raised from 256 to 4096" in server.output()
        # 4,096 is low for a server: the start says so, and how to raise it.
        assert "at most 4096 open files: about that many client connections" in server.output()


def test_connections_that_never_finish_the_handshake_are_closed(example_onnx: Path) -> None:
    server = ServerProcess(["--model", f"example={example_onnx}",
                            "--grpc-handshake-timeout-s", "1"])
    with server.serving(), _idle_connections(server.port, 20, data=b"") as silent:
        start = time.monotonic()
        for s in silent:
            s.settimeout(10)
            while s.recv(64 * 1024):  # the server's SETTINGS and GOAWAY, then its close
                pass
        assert time.monotonic() - start < 5
        _served(server.url)


@contextmanager
def _watched(client: Client) -> Iterator[list[str]]:
    """The names of the states the client's channel goes through, as they come."""
    states: list[str] = []
    channel = client._channel  # the test reads gRPC's view of the connection

    def seen(state: grpc.ChannelConnectivity) -> None:
        states.append(state.name)

    channel.subscribe(seen)
    try:
        yield states
    finally:
        channel.unsubscribe(seen)


def test_an_idle_connection_is_closed_and_the_client_reconnects(example_onnx: Path) -> None:
    server = ServerProcess(["--model", f"example={example_onnx}",
                            "--grpc-max-connection-idle-s", "0.5"])
    x = np.ones((1, 64), np.float32)
    with server.serving(), Client(server.url) as c, _watched(c) as states:
        c.infer("example", {"input": x}, timeout=10)
        deadline = time.monotonic() + 10
        while "READY" not in states and time.monotonic() < deadline:
            time.sleep(0.01)  # gRPC tells of each state from a thread of its own
        assert "READY" in states, states
        while states[-1] != "IDLE" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert states[-1] == "IDLE", states  # the server's GOAWAY, unasked
        assert c.infer("example", {"input": x}, timeout=10)["output"].shape == (1, 16)


def test_aged_connections_are_replaced_without_failing_a_call(example_onnx: Path) -> None:
    """Two frontends, connections told to go every 0.5 s while one client calls
    back to back: every call is answered, across several connections."""
    server = ServerProcess(["--model", f"example={example_onnx}", "--frontends", "2",
                            "--grpc-max-connection-age-s", "0.5",
                            "--grpc-max-connection-age-grace-s", "5"])
    rng = np.random.default_rng(1)
    with server.serving(), Client(server.url) as c, _watched(c) as states:
        end = time.monotonic() + 3
        calls = 0
        while time.monotonic() < end:
            x = rng.standard_normal((1, 64)).astype(np.float32)
            c.infer("example", {"input": x}, timeout=10)
            calls += 1
        assert states.count("READY") >= 3, states
        assert calls > 30


def _held(socks: list[socket.socket]) -> list[bool]:
    """For each connection, whether the server holds it: it answers the preface with its
    SETTINGS, where one over the cap is closed as it opens (EOF or a reset)."""
    held = []
    for s in socks:
        s.settimeout(10)
        try:
            held.append(bool(s.recv(64 * 1024)))
        except ConnectionResetError:
            held.append(False)
    return held


@pytest.mark.parametrize("frontends", [1, 2])
def test_connections_past_the_cap_are_closed_and_those_held_are_served(
        example_onnx: Path, frontends: int) -> None:
    """`--grpc-max-connections 40`: each process holds 40 connections, one client's
    among them; 200 more that connect and send nothing leave room for no other, and
    that client goes on being served. Once they close, a new client connects."""
    cap = 40
    server = ServerProcess(["--model", f"example={example_onnx}",
                            "--frontends", str(frontends),
                            "--grpc-max-connections", str(cap)])
    with server.serving(), Client(server.url) as first:
        _served_by(first)
        with _idle_connections(server.port, 200) as flood:
            # The kernel spreads connections over the frontends by hash; 200 fill both.
            assert sum(_held(flood)) == cap * frontends - 1
            _served_by(first)  # its connection is held
            # Stats shows each frontend's open files: its connections among them.
            full = {f.index: f.open_files for f in first.stats().frontends}
            # A connection of its own (gRPC's clients share one per target by default).
            with grpc.insecure_channel(server.url, options=[
                    ("grpc.use_local_subchannel_pool", 1)]) as late, \
                    pytest.raises(grpc.RpcError) as refused:
                health_pb2_grpc.HealthStub(late).Check(health_pb2.HealthCheckRequest(),
                                                       timeout=2)
            assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE,
                                            grpc.StatusCode.DEADLINE_EXCEEDED), refused.value
        time.sleep(0.5)  # the server sees them close
        _served(server.url)
        if frontends > 1:
            after = {f.index: f.open_files for f in first.stats().frontends}
            assert sorted(full) == sorted(after) == [0, 1]
            # Each had held 40 connections (or 39 and the first client's): they are gone.
            assert all(full[i] - after[i] >= cap - 1 for i in full), (full, after)


def test_the_cap_fits_the_open_file_limit(example_onnx: Path) -> None:
    """Under an open-file limit of 1,024 (soft and hard), the cap is lowered to what the
    limit leaves past the server's own files, and the start says so."""
    server = ServerProcess(["--model", f"example={example_onnx}"],
                           preexec=_limit(1024, 1024))
    with server.serving():
        _served(server.url)
    room = 1024 - open_files.OWN_FILES
    assert (f"at most {room} gRPC connections per process, not "
            "server.grpc_max_connections' 10000: what the open-file limit (1024) leaves "
            "after the server's own files") in server.output()


def test_connection_cap_leaves_room_for_the_own_files_and_http() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
        room = 2048 - open_files.OWN_FILES
        assert open_files.connection_cap(10_000, 0) == room
        assert open_files.connection_cap(100, 0) == 100
        assert open_files.connection_cap(0, 0) == room  # no cap asked: what fits
        assert open_files.connection_cap(10_000, 512) == room - 512
        # HTTP's cap takes at most half of the room: gRPC keeps the other half.
        assert open_files.connection_cap(10_000, 100_000) == room - room // 2
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _never_sent() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""  # pragma: no cover - never reached


@pytest.mark.parametrize("frontends", [1, 2])
def test_calls_past_max_calls_in_flight_are_resource_exhausted(
        example_onnx: Path, frontends: int) -> None:
    """`--max-calls-in-flight 20`: 20 Infer calls that send their headers and never their
    message hold the process's 20 places; one more is RESOURCE_EXHAUSTED at once, not
    held. Once they end (their deadline), calls are served again."""
    server = ServerProcess(["--model", f"example={example_onnx}",
                            "--frontends", str(frontends), "--max-calls-in-flight", "20"])
    x = np.ones((1, 64), np.float32)

    async def run() -> tuple[list[grpc.StatusCode], grpc.StatusCode, float]:
        # One channel: one connection, so all its calls are one process's.
        async with grpc.aio.insecure_channel(server.url) as channel:
            infer = channel.stream_unary("/trtserve.v1.InferenceService/Infer")
            held = [infer(_never_sent(), timeout=3) for _ in range(20)]
            await asyncio.sleep(1)  # the server has them all
            start = time.monotonic()
            one_more = infer(_never_sent(), timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await one_more
            waited = time.monotonic() - start
            codes = []
            for call in held:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call
                codes.append(err.value.code())
            return codes, refused.value.code(), waited

    with server.serving():
        codes, refused, waited = asyncio.run(run())
        assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}
        assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert waited < 2  # answered from its headers, not after its deadline
        with Client(server.url) as c:
            assert c.infer("example", {"input": x}, timeout=10)["output"].shape == (1, 16)


def test_refused_and_failed_calls_give_their_place_back(example_onnx: Path) -> None:
    """With 5 places, 90 calls refused (no token), failed (an unknown model) and invalid
    (a wrong shape) in turn leave every place free: a good call is served after them."""
    token = "a-token-of-thirty-two-characters!"
    server = ServerProcess(["--model", f"example={example_onnx}", "--max-calls-in-flight",
                            "5"], env={**os.environ, "TRTSERVE_AUTH_TOKEN": token})
    x = np.ones((1, 64), np.float32)
    with server.serving(), Client(server.url) as anonymous, \
            Client(server.url, token=token) as client:
        codes = []
        for _ in range(30):
            for c, model, tensor in ((anonymous, "example", x), (client, "absent", x),
                                     (client, "example", x[:, :3])):
                with pytest.raises(InferenceError) as err:
                    c.infer(model, {"input": tensor}, timeout=10)
                codes.append(err.value.code)
        assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.INVALID_ARGUMENT}
        assert client.infer("example", {"input": x}, timeout=10)["output"].shape == (1, 16)


@pytest.mark.parametrize(("key", "value"), [
    ("grpc_max_connections", -1), ("grpc_max_connections", 2_000_000),
    ("grpc_max_connection_idle_s", -1.0), ("grpc_max_connection_age_s", 31 * 24 * 3600.0),
    ("grpc_handshake_timeout_s", 0), ("max_calls_in_flight", -1)])
def test_connection_settings_out_of_range_are_refused_naming_the_key(
        key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"server\.{key}: got {value}"):
        ServerConfig(**{key: value})


def test_raise_to_hard_reports_what_it_did() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    files = open_files.raise_to_hard()
    try:
        assert files.before == soft and not files.error
        assert files.limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert files.limit == (hard if hard != resource.RLIM_INFINITY else files.limit)
        assert open_files.raise_to_hard() == open_files.OpenFiles(files.limit, files.limit)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def _opened(count: int) -> Iterator[None]:
    files = [open(os.devnull) for _ in range(count)]  # noqa: SIM115 - closed below
    try:
        yield
    finally:
        for f in files:
            f.close()


def test_held_files_are_counted_as_they_open_and_close() -> None:
    held = open_files.Held(os.getpid())
    before = held.count()
    with _opened(5):
        assert held.count() == before + 5
    assert held.count() == before
    assert open_files.Held(2**22 + 1).count() == 0  # no such process


def test_an_old_kernels_listed_count_is_reused_for_its_ttl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels before 6.2 give /proc/PID/fd a size of 0. This one cannot be made old, so
    os.stat answers as one would (a double); the listing is real."""
    real_stat = os.stat

    def old_kernels_stat(path: str) -> os.stat_result:
        st = real_stat(path)
        fields = list(st[:10])
        fields[6] = 0  # st_size
        return os.stat_result(fields)

    monkeypatch.setattr(open_files.os, "stat", old_kernels_stat)
    held = open_files.Held(os.getpid(), listed_ttl_s=1.0)
    before = held.count()
    assert before == len(os.listdir(f"/proc/{os.getpid()}/fd"))
    with _opened(5):
        assert held.count() == before  # listed less than listed_ttl_s ago: reused
        time.sleep(1.05)
        assert held.count() == before + 5
