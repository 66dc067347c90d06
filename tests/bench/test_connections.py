"""`Endpoint.aio_channel(own_connection=True)`, which `trtserve-client bench --connections`
uses: each channel gets a TCP connection of its own, seen as distinct peers by a real
gRPC server on a real socket (a server of several frontend processes is spread over by
connection, so a load generator with one shared connection would load one of them)."""

import grpc
import pytest

from trtserve.client.bench.config import BenchConfig, Level
from trtserve.client.channels import Endpoint

METHOD = "/test.Peers/Peer"


@pytest.fixture
async def peer_server():
    """A real grpc.aio server whose one method answers with the caller's peer address."""

    async def peer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return context.peer().encode()

    handler = grpc.method_handlers_generic_handler("test.Peers", {
        "Peer": grpc.unary_unary_rpc_method_handler(peer)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def _peers(url: str, own_connection: bool, channels: int = 3) -> set[bytes]:
    opened = [Endpoint(url).aio_channel(own_connection=own_connection) for _ in range(channels)]
    try:
        return {await c.unary_unary(METHOD)(b"") for c in opened}
    finally:
        for c in opened:
            await c.close(None)


async def test_channels_with_their_own_connection_reach_the_server_as_distinct_peers(
        peer_server):
    assert len(await _peers(peer_server, own_connection=True)) == 3


async def test_channels_by_default_share_one_connection(peer_server):
    # What --connections exists for: without it, gRPC pools the connection.
    assert len(await _peers(peer_server, own_connection=False)) == 1


def test_connections_below_one_is_refused_by_name():
    with pytest.raises(ValueError, match="--connections: got 0"):
        BenchConfig(url="x", model="m", levels=(Level("closed", 1),), connections=0)
