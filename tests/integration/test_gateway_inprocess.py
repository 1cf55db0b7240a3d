"""The gateway app in-process on loopback: replica sets that change at runtime, and request spans."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.app import GATEWAY_KEY, build_app
from gateway.metrics import GatewayMetrics
from gateway.prediction import ColdPredictor
from gateway.settings import Settings
from pools.types import PoolConfig
from predictor.fingerprint import output_fingerprint
from predictor.types import Outcome, Prediction, RequestFeatures, Tags
from tests.fakes.openai_server import FakeUpstream

MODEL = "test-model"


@pytest.fixture
async def upstreams() -> AsyncIterator[list[TestServer]]:
    servers = [TestServer(FakeUpstream(n, MODEL).app(), host="127.0.0.1") for n in ("x", "y")]
    for s in servers:
        await s.start_server()
    yield servers
    for s in servers:
        await s.close()


def url_of(server: TestServer) -> str:
    return str(server.make_url("")).rstrip("/")


async def chat(base: str) -> tuple[int, dict[str, str]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "metadata": {"app": "a1", "agent": "planner"}}
    async with aiohttp.ClientSession() as s, s.post(base + "/v1/chat/completions", json=body) as r:
        await r.read()
        return r.status, dict(r.headers)


async def test_replicas_added_and_removed_at_runtime(upstreams: list[TestServer]) -> None:
    x, y = (url_of(s) for s in upstreams)
    settings = Settings(routing_headers=True, health_interval_s=0.1)
    app = build_app(settings, [PoolConfig("p", 8192, (MODEL,), (x,))], ColdPredictor(), GatewayMetrics())
    gw = app[GATEWAY_KEY]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        base = url_of(server)
        assert (await chat(base))[1]["x-pythia-replica"] == x
        assert gw.set_replicas({"p": [x, y]})
        assert not gw.set_replicas({"p": [x, y]})  # no change
        seen = {(await chat(base))[1]["x-pythia-replica"] for _ in range(6)}
        assert seen == {x, y}
        gw.set_replicas({"p": [y]})
        assert {(await chat(base))[1]["x-pythia-replica"] for _ in range(4)} == {y}
        gw.set_replicas({"p": []})
        status, headers = await chat(base)
        assert status == 503 and "Retry-After" in headers
        async with aiohttp.ClientSession() as s, s.get(base + "/ready") as r:
            assert r.status == 503
    finally:
        await server.close()


async def test_background_senders_can_call_a_replica_over_the_pool(upstreams: list[TestServer]) -> None:
    x = url_of(upstreams[0])
    app = build_app(Settings(), [PoolConfig("p", 8192, (MODEL,), (x,))], ColdPredictor(), GatewayMetrics())
    gw = app[GATEWAY_KEY]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        body = b'{"model":"test-model","messages":[{"role":"user","content":"warm"}],"max_tokens":1}'
        status, data = await gw.call_replica(x, "/v1/chat/completions", body)
        assert status == 200 and b"chat.completion" in data
        with pytest.raises(KeyError):
            await gw.call_replica("http://127.0.0.1:1", "/v1/chat/completions", body)
    finally:
        await server.close()


async def test_upstream_silence_is_504_before_the_first_byte(upstreams: list[TestServer]) -> None:
    x = url_of(upstreams[0])
    settings = Settings(read_timeout_s=0.3)
    app = build_app(settings, [PoolConfig("p", 8192, (MODEL,), (x,))], ColdPredictor(), GatewayMetrics())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    base = url_of(server)
    slow = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "fake": {"chunks": 3, "delay_s": 1.0}}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(base + "/v1/chat/completions", json=slow) as r:
                assert r.status == 504
                assert (await r.json())["error"]["code"] == "upstream_timeout"
            fast_then_stall = {**slow, "stream": True, "fake": {"chunks": 3, "delay_s": 0.0}}
            async with s.post(base + "/v1/chat/completions", json=fast_then_stall) as r:
                assert r.status == 200  # a healthy stream still flows
                assert (await r.read()).endswith(b"data: [DONE]\n\n")
            async with s.post(base + "/v1/chat/completions", json={**slow, "stream": True}) as r:
                # our SSE headers leave with the first chunk, which never came: still a plain 504
                assert r.status == 504
                assert (await r.json())["error"]["code"] == "upstream_timeout"
    finally:
        await server.close()


@pytest.mark.parametrize("forward", [True, False])
async def test_policy_priority_reaches_the_engine_only_when_forwarded(upstreams: list[TestServer], forward: bool) -> None:
    fake = upstreams[0]
    x = url_of(fake)
    settings = Settings(policy="pythia", forward_priority=forward)
    app = build_app(settings, [PoolConfig("p", 8192, (MODEL,), (x,))], ColdPredictor(), GatewayMetrics())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert (await chat(url_of(server)))[0] == 200
    finally:
        await server.close()
    async with aiohttp.ClientSession() as s, s.get(x + "/debug/stats") as r:
        forwarded = orjson.loads((await r.json())["last_body"])
    assert ("priority" in forwarded) is forward


class RecordingPredictor(ColdPredictor):
    def __init__(self) -> None:
        self.seen: list[tuple[Tags, RequestFeatures, Outcome]] = []

    def observe(self, tags: Tags, features: RequestFeatures, prediction: Prediction, outcome: Outcome) -> None:
        self.seen.append((tags, features, outcome))


async def test_the_predictor_observes_usage_and_fingerprints_of_untagged_calls(upstreams: list[TestServer]) -> None:
    x = url_of(upstreams[0])
    rec = RecordingPredictor()
    app = build_app(Settings(), [PoolConfig("p", 8192, (MODEL,), (x,))], rec, GatewayMetrics())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    msgs = [{"role": "system", "content": "You are a searcher."}, {"role": "user", "content": "rivers " * 60}]
    try:
        async with aiohttp.ClientSession() as s:
            for stream in (False, True):
                body = {"model": MODEL, "messages": msgs, "stream": stream, "fake": {"chunks": 30}}
                async with s.post(url_of(server) + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    await r.read()
            tagged = {"model": MODEL, "messages": msgs, "fake": {"chunks": 30}}
            async with s.post(url_of(server) + "/v1/chat/completions", json=tagged, headers={"X-Pythia-Workflow": "w"}) as r:
                await r.read()
    finally:
        await server.close()
    (_, f1, o1), (_, _, o2), (t3, f3, o3) = rec.seen
    text = "".join(f"x-w{i} " for i in range(30))
    assert o1.ok and o1.output_tokens == 30 and o1.output_fingerprint == output_fingerprint(text)
    assert o2.ok and o2.output_fingerprint == output_fingerprint(text)  # from the SSE deltas
    assert f1.content_hashes and f1.message_fingerprints and f1.messages[0]["role"] == "system"
    assert t3.workflow == "w" and not f3.content_hashes and o3.output_fingerprint == ""


async def test_unhealthy_replica_marked_down_by_active_checks(upstreams: list[TestServer]) -> None:
    x, y = (url_of(s) for s in upstreams)
    settings = Settings(routing_headers=True, health_interval_s=0.1, health_timeout_s=0.5)
    app = build_app(settings, [PoolConfig("p", 8192, (MODEL,), (x, y))], ColdPredictor(), GatewayMetrics())
    gw = app[GATEWAY_KEY]
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        await upstreams[1].close()
        t0 = time.monotonic()
        while gw.replicas[y].healthy and time.monotonic() - t0 < 3.0:
            await asyncio.sleep(0.02)
        assert not gw.replicas[y].healthy
        assert gw.replicas[x].healthy
        # the scraper filled the engine fields from the fake's vLLM metrics
        assert gw.replicas[x].kv_capacity_tokens == 16000
        assert gw.replicas[x].kv_usage == 0.25
    finally:
        await server.close()


async def test_each_request_gets_a_span_with_the_routing_decision(upstreams: list[TestServer]) -> None:
    x = url_of(upstreams[0])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = build_app(
        Settings(), [PoolConfig("p", 8192, (MODEL,), (x,))], ColdPredictor(), GatewayMetrics(),
        tracer=provider.get_tracer("test"),
    )  # fmt: skip
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        assert (await chat(url_of(server)))[0] == 200
    finally:
        await server.close()
    (span,) = exporter.get_finished_spans()
    attrs = dict(span.attributes or {})
    assert attrs["pythia.pool"] == "p" and attrs["pythia.replica"] == x
    assert attrs["pythia.policy"] == "round_robin" and attrs["pythia.app"] == "a1"
    assert attrs["http.response.status_code"] == 200
