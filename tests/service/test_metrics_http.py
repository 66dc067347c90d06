"""The exposition cache and the request parser of the metrics endpoint, on a real loop."""

from __future__ import annotations

import asyncio

import pytest

from trtserve.service.metrics_http import (
    Exposition,
    RenderError,
    _BadRequest,
    _parse,
    bearer_matches,
)
from trtserve.service.metrics_http import _digest as digest


def test_concurrent_scrapes_share_one_render_and_later_ones_a_fresh_one():
    calls = 0

    async def render() -> bytes:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return b"text %d" % calls

    async def main() -> None:
        exposition = Exposition(render, interval_s=0.0, timeout_s=10)
        first = await asyncio.gather(*(exposition.get() for _ in range(50)))
        assert {r.text for r in first} == {b"text 1"} and calls == 1
        assert (await exposition.get()).text == b"text 2"  # interval 0: a new one
        cached = Exposition(render, interval_s=3600, timeout_s=10)
        assert (await cached.get()).text == (await cached.get()).text == b"text 3"
        assert cached.renders == 1

    asyncio.run(main())


def test_a_render_the_server_does_not_answer_fails_within_the_timeout_and_the_next_retries():
    async def main() -> None:
        answer = asyncio.Event()
        calls = 0

        async def render() -> bytes:
            nonlocal calls
            calls += 1
            if calls == 1:
                await answer.wait()  # the server's loop is stalled
            return b"ok"

        exposition = Exposition(render, interval_s=3600, timeout_s=0.05)
        with pytest.raises(RenderError, match="not read within"):
            await asyncio.wait_for(exposition.get(), 10)
        assert (await asyncio.wait_for(exposition.get(), 10)).text == b"ok"

    asyncio.run(main())


def test_one_scraper_giving_up_does_not_cancel_the_render_others_wait_for():
    async def main() -> None:
        release = asyncio.Event()

        async def render() -> bytes:
            await release.wait()
            return b"ok"

        exposition = Exposition(render, interval_s=0, timeout_s=10)
        impatient = asyncio.ensure_future(exposition.get())
        patient = asyncio.ensure_future(exposition.get())
        await asyncio.sleep(0)
        impatient.cancel()
        release.set()
        assert (await patient).text == b"ok"

    asyncio.run(main())


@pytest.mark.parametrize(("head", "keep_alive"), [
    (b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", True),
    (b"GET /metrics?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n", False),
    (b"GET /metrics HTTP/1.0\r\n\r\n", False),
    (b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
])
def test_requests_parse(head, keep_alive):
    request = _parse(head)
    assert (request.method, request.path, request.keep_alive) == ("GET", "/metrics", keep_alive)


@pytest.mark.parametrize("head", [
    b"GET /metrics\r\n\r\n", b"GET /metrics HTTP/2\r\n\r\n", b"GET  /metrics HTTP/1.1\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", b"GET /metrics HTTP/1.1\r\n x: y\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
    b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
])
def test_malformed_requests_and_bodies_are_refused(head):
    with pytest.raises(_BadRequest):
        _parse(head)


def test_bearer_tokens_match_only_exactly():
    expected = digest(b"s3cret")
    assert bearer_matches("Bearer s3cret", expected)
    assert bearer_matches("bearer  s3cret ", expected)
    for wrong in ("Bearer s3cre", "Bearer s3cretx", "Basic s3cret", "s3cret", "", "Bearer"):
        assert not bearer_matches(wrong, expected), wrong
