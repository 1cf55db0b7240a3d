"""The upstream read timeout is the longest silence allowed, per wait, on kept-alive connections too.

The client keeps one timer per upstream connection and re-arms it lazily; these check what a user
sees: slow-but-steady streams complete, a silent upstream is a 504, and a connection reused after
a quick answer still times out a later silent call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import build_app
from gateway.metrics import GatewayMetrics
from gateway.prediction import ColdPredictor
from gateway.settings import Settings
from pools.types import PoolConfig
from tests.fakes.openai_server import FakeUpstream

MODEL = "test-model"


@pytest.fixture
async def gateway_url() -> AsyncIterator[str]:
    upstream = TestServer(FakeUpstream("x", MODEL).app(), host="127.0.0.1")
    await upstream.start_server()
    x = str(upstream.make_url("")).rstrip("/")
    settings = Settings.model_validate({"read_timeout_s": 0.3})
    app = build_app(settings, [PoolConfig("p", 8192, (MODEL,), (x,))], ColdPredictor(), GatewayMetrics())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()
        await upstream.close()


def _body(stream: bool, chunks: int, delay_s: float) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream,
            "fake": {"chunks": chunks, "delay_s": delay_s}}  # fmt: skip


async def test_a_stream_longer_than_the_read_timeout_completes_when_no_gap_is(gateway_url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the second call reuses the kept-alive upstream connection and its timer
            async with s.post(gateway_url + "/v1/chat/completions", json=_body(True, 5, 0.12)) as r:
                assert r.status == 200
                assert (await r.read()).endswith(b"data: [DONE]\n\n")


async def test_a_reused_connection_still_times_out_a_silent_call(gateway_url: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(gateway_url + "/v1/chat/completions", json=_body(False, 1, 0.0)) as r:
            assert r.status == 200
        async with s.post(gateway_url + "/v1/chat/completions", json=_body(False, 1, 1.0)) as r:
            assert r.status == 504
            assert (await r.json())["error"]["code"] == "upstream_timeout"
        async with s.post(gateway_url + "/v1/chat/completions", json=_body(True, 3, 0.0)) as r:
            assert r.status == 200  # and the gateway goes on serving
            assert (await r.read()).endswith(b"data: [DONE]\n\n")
