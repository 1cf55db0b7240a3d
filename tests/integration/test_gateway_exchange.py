"""Calls served without a task (gateway/exchange.py) behave as the task path does, as a client and a replica see it.

`pythia serve` (one worker, so its counts are the ones /pythia/replicas shows) in front of two fake
upstreams: answers on kept-alive connections, the read timeout on a reused connection, a 5xx handed
back to the retry path, a client that leaves mid-call, a stream handed to the relay; after each, no
call may stay counted in flight on a replica (the router would route around a phantom load).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from gateway.app import build_app
from gateway.fastpath import FastServer
from gateway.metrics import GatewayMetrics
from gateway.prediction import ColdPredictor
from gateway.settings import Settings
from pools.types import PoolConfig
from tests.conftest import Proc, ProcessGroup
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"


@dataclass
class Cluster:
    gateway: Proc
    upstreams: list[Proc]


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessGroup) -> Iterator[Cluster]:
    ups = [start_fake_upstream(module_procs, n, MODEL) for n in ("a", "b")]
    pools = [{"name": "short", "max_context_tokens": 16384, "models": [MODEL], "replicas": [p.url for p in ups]}]
    gw = start_gateway(module_procs, pools, workers=1, routing_headers=True, read_timeout_s=0.5, health_interval_s=60)
    yield Cluster(gw, ups)


@pytest.fixture(scope="module")
def solo(module_procs: ProcessGroup) -> Iterator[Cluster]:
    """A gateway with one replica: every call after the first finds a kept-alive connection to it."""
    up = start_fake_upstream(module_procs, "solo", MODEL)
    pools = [{"name": "short", "max_context_tokens": 16384, "models": [MODEL], "replicas": [up.url]}]
    yield Cluster(start_gateway(module_procs, pools, workers=1, read_timeout_s=0.5, health_interval_s=60), [up])


def chat(stream: bool = False, **fake: object) -> dict[str, object]:
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if fake:
        body["fake"] = fake
    return body


async def inflight(url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as s, s.get(url + "/pythia/replicas") as r:
        view = await r.json()
    return {rep["url"]: rep["inflight"] for pool in view["pools"] for rep in pool["replicas"]}


async def none_in_flight(url: str) -> dict[str, int]:
    """The replicas' in-flight counts once they settle (a cancelled call is released as its connection closes)."""
    deadline = time.monotonic() + 3.0
    while True:
        counts = await inflight(url)
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.05)


async def upstream_stats(url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as s, s.get(url + "/debug/stats") as r:
        return dict(await r.json())


async def cancelled(cluster: Cluster, expect: int | None = None) -> int:
    """Calls the upstreams saw abandoned; with `expect`, polled (up to 3 s) until there are that many."""
    deadline = time.monotonic() + 3.0
    while True:
        total = sum([(await upstream_stats(u.url))["cancelled"] for u in cluster.upstreams])
        if expect is None or total >= expect or time.monotonic() > deadline:
            return total
        await asyncio.sleep(0.05)


def test_the_completion_routes_start_without_a_task_unless_something_wraps_them() -> None:
    pools = [PoolConfig("p", 8192, (MODEL,), ("http://127.0.0.1:9",))]
    plain = FastServer(build_app(Settings(), pools, ColdPredictor(), GatewayMetrics()), lambda: None, 1 << 20)  # type: ignore[arg-type,return-value]
    plain.resolve_handlers()
    assert set(plain.starts) == {b"/v1/chat/completions", b"/v1/completions"}
    keyed_app = build_app(Settings(api_keys="sk-1"), pools, ColdPredictor(), GatewayMetrics())
    keyed = FastServer(keyed_app, lambda: None, 1 << 20)  # type: ignore[arg-type,return-value]
    keyed.resolve_handlers()
    assert keyed.starts == {} and set(keyed.handlers) == {b"/v1/chat/completions", b"/v1/completions"}


async def test_kept_alive_calls_get_the_upstream_answer_and_leave_nothing_in_flight(cluster: Cluster) -> None:
    seen = set()
    async with aiohttp.ClientSession() as s:
        for i in range(20):
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body = chat() if i % 2 else {"model": MODEL, "prompt": "hi"}
            async with s.post(cluster.gateway.url + path, json=body) as r:
                assert r.status == 200
                answer = await r.json()
                replica = r.headers["x-pythia-replica"]
            name = replica.rsplit("/", 1)[-1]
            text = answer["choices"][0]["message"]["content"] if i % 2 else answer["choices"][0]["text"]
            assert text.startswith(("a-w0", "b-w0")) and answer["usage"]["completion_tokens"] == 4
            seen.add(name)
    assert len(seen) == 2  # both replicas served
    assert set((await none_in_flight(cluster.gateway.url)).values()) == {0}


async def test_a_silent_upstream_on_a_reused_connection_is_a_504_and_the_gateway_goes_on(solo: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the first call opens the upstream connection, the second reuses it
            async with s.post(solo.gateway.url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
        await asyncio.sleep(0.6)  # past any timer the earlier calls armed
        t0 = time.monotonic()
        async with s.post(solo.gateway.url + "/v1/chat/completions", json=chat(chunks=2, delay_s=1.0)) as r:
            assert r.status == 504
            assert (await r.json())["error"]["code"] == "upstream_timeout"
        assert 0.45 < time.monotonic() - t0 < 1.8  # the timeout (0.5 s) from when this call was sent, not the answer (2 s)
        async with s.post(solo.gateway.url + "/v1/chat/completions", json=chat()) as r:
            assert r.status == 200
    assert set((await none_in_flight(solo.gateway.url)).values()) == {0}


async def test_a_5xx_is_handed_to_the_retry_path(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(4):  # whichever replica is chosen first, "a" fails and "b" answers
            async with s.post(cluster.gateway.url + "/v1/chat/completions", json=chat(fail_names=["a"])) as r:
                assert r.status == 200
                assert r.headers["x-pythia-replica"] == cluster.upstreams[1].url
                assert (await r.json())["choices"][0]["message"]["content"].startswith("b-w0")
    assert set((await none_in_flight(cluster.gateway.url)).values()) == {0}


async def test_a_client_that_leaves_mid_call_cancels_it_upstream_and_is_released(cluster: Cluster) -> None:
    before = await cancelled(cluster)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(
                cluster.gateway.url + "/v1/chat/completions", json=chat(chunks=4, delay_s=0.1),
                timeout=aiohttp.ClientTimeout(total=0.2),
            ) as r:  # fmt: skip
                await r.read()
    assert await cancelled(cluster, before + 1) == before + 1  # the engine saw the client leave
    assert set((await none_in_flight(cluster.gateway.url)).values()) == {0}
    async with aiohttp.ClientSession() as s, s.get(cluster.gateway.url + "/metrics") as r:
        assert 'status="499"' in await r.text()


async def test_a_stream_is_relayed_whole(cluster: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(cluster.gateway.url + "/v1/chat/completions", json=chat(stream=True, chunks=6)) as r:
            assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
            data = await r.read()
        replica = r.headers["x-pythia-replica"]
        async with s.get(replica + "/debug/last_response") as u:
            assert data == await u.read()  # byte for byte what the replica sent
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: {")]
    assert len(events) == 6 and orjson.loads(events[0][6:])["choices"][0]["delta"]["content"].endswith("-w0 ")
    assert set((await none_in_flight(cluster.gateway.url)).values()) == {0}


async def test_a_client_that_leaves_mid_stream_cancels_it_upstream_and_is_released(cluster: Cluster) -> None:
    before = await cancelled(cluster)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(cluster.gateway.url + "/v1/chat/completions", json=chat(stream=True, chunks=100, delay_s=0.02))
        assert (await resp.content.readany()).startswith(b"data: ")
        resp.close()  # drop the connection mid-stream
    assert await cancelled(cluster, before + 1) == before + 1
    assert set((await none_in_flight(cluster.gateway.url)).values()) == {0}


async def test_an_upstream_that_breaks_mid_stream_ends_it_with_an_error_event(cluster: Cluster) -> None:
    body = chat(stream=True, chunks=6, abort_after=3)
    async with aiohttp.ClientSession() as s, s.post(cluster.gateway.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        data = await r.read()  # a whole chunked answer: the client sees the stream end, not a reset
    events = [e for e in data.split(b"\n\n") if e.startswith(b"data: ")]
    assert len(events) == 5 and b"upstream_disconnect" in events[3] and events[4] == b"data: [DONE]"
    assert set((await none_in_flight(cluster.gateway.url)).values()) == {0}


async def test_stream_read_timeout_is_the_longest_silence(solo: Cluster) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # kept-alive connection in place: the calls below run as exchanges
            async with s.post(solo.gateway.url + "/v1/chat/completions", json=chat()) as r:
                assert r.status == 200
        # 1.2 s in all, never silent for 0.5 s: it completes
        async with s.post(solo.gateway.url + "/v1/chat/completions", json=chat(stream=True, chunks=4, delay_s=0.3)) as r:
            assert r.status == 200 and (await r.read()).endswith(b"data: [DONE]\n\n")
        # silent for longer than the timeout before its first byte: a plain 504
        async with s.post(solo.gateway.url + "/v1/chat/completions", json=chat(stream=True, chunks=2, delay_s=1.0)) as r:
            assert r.status == 504 and (await r.json())["error"]["code"] == "upstream_timeout"
    assert set((await none_in_flight(solo.gateway.url)).values()) == {0}


async def test_a_slow_reader_gets_a_long_stream_byte_for_byte(solo: Cluster) -> None:
    host, port = solo.gateway.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # so that the gateway's buffers fill, not ours
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        for _ in range(2):  # the second call on the gateway's kept-alive upstream connection is an exchange
            body = orjson.dumps(chat(stream=True, chunks=30000))  # ~3 MB: more than the loopback socket buffers
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
            # a reader stalled for longer than the read timeout: the gateway stops reading the upstream (that is
            # not the upstream falling silent), then picks up again
            await asyncio.sleep(1.0)
            parts = []
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            async with aiohttp.ClientSession() as s, s.get(solo.upstreams[0].url + "/debug/last_response") as u:
                sent = await u.read()
            assert len(sent) > 3_000_000 and b"".join(parts) == sent
    finally:
        writer.close()
    assert set((await none_in_flight(solo.gateway.url)).values()) == {0}

