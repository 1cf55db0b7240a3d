"""Failures through `pythia serve` (2 workers, three fake upstreams): retries, dead replicas, disconnects, SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from tests.conftest import Proc, ProcessGroup, http_status
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"


@dataclass
class Cluster:
    gateway: Proc
    upstreams: list[Proc]
    group: ProcessGroup

    @property
    def url(self) -> str:
        return self.gateway.url


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessGroup) -> Iterator[Cluster]:
    ups = [start_fake_upstream(module_procs, n, MODEL) for n in ("a", "b", "c")]
    pools = [{"name": "short", "max_context_tokens": 16384, "models": [MODEL], "replicas": [p.url for p in ups]}]
    gw = start_gateway(module_procs, pools, workers=2, routing_headers=True, health_interval_s=0.25)
    yield Cluster(gw, ups, module_procs)


def chat(stream: bool = False, **fake: object) -> bytes:
    body: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if fake:
        body["fake"] = fake
    return orjson.dumps(body)


async def post(url: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", data=body) as r:
        return r.status, await r.read(), dict(r.headers)


async def stats(url: str) -> dict[str, object]:
    async with aiohttp.ClientSession() as s, s.get(url + "/debug/stats") as r:
        return dict(await r.json())


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as r:
        return await r.text()


def metric(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_5xx_is_retried_on_another_replica(cluster: Cluster) -> None:
    before = await metrics_text(cluster.url)
    for _ in range(9):
        status, _, headers = await post(cluster.url, chat(fail_names=["b"]))
        assert status == 200
        assert headers["x-pythia-replica"] != cluster.upstreams[1].url
    after = await metrics_text(cluster.url)
    key = 'pythia_retries_total{pool="short",reason="status"}'
    assert metric(after, key) - metric(before, key) >= 1


async def test_5xx_everywhere_returns_the_upstream_error(cluster: Cluster) -> None:
    status, body, _ = await post(cluster.url, chat(status=500))
    assert status == 500
    assert "error" in orjson.loads(body)


async def test_mid_stream_upstream_failure_ends_with_error_event(cluster: Cluster) -> None:
    status, body, _ = await post(cluster.url, chat(stream=True, chunks=5, abort_after=2))
    assert status == 200
    events = [e for e in body.split(b"\n\n") if e]
    assert len(events) == 4  # two content chunks, the error, [DONE]
    err = orjson.loads(events[2].removeprefix(b"data: "))
    assert err["error"]["code"] == "upstream_disconnect"
    assert events[3] == b"data: [DONE]"


async def test_client_disconnect_cancels_upstream(cluster: Cluster) -> None:
    before = {u.url: (await stats(u.url))["cancelled"] for u in cluster.upstreams}
    async with aiohttp.ClientSession() as s:
        resp = await s.post(cluster.url + "/v1/chat/completions", data=chat(stream=True, chunks=100, delay_s=0.05))
        replica = resp.headers["x-pythia-replica"]
        first = await resp.content.readany()
        assert first.startswith(b"data: ")
        resp.close()  # drop the connection mid-stream
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        st = await stats(replica)
        if st["cancelled"] == before[replica] + 1 and st["running"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (st["cancelled"], st["running"]) == (before[replica] + 1, 0)


async def test_client_disconnect_cancels_non_streamed_upstream(cluster: Cluster) -> None:
    before = {u.url: (await stats(u.url))["cancelled"] for u in cluster.upstreams}
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(
                cluster.url + "/v1/chat/completions", data=chat(chunks=100, delay_s=0.05),
                timeout=aiohttp.ClientTimeout(total=0.5),
            ) as r:  # fmt: skip
                await r.read()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        after = {u.url: (await stats(u.url))["cancelled"] for u in cluster.upstreams}
        if sum(after.values()) == sum(before.values()) + 1:
            break
        await asyncio.sleep(0.05)
    assert sum(after.values()) == sum(before.values()) + 1


async def test_sigkilled_replica_is_skipped_then_comes_back(cluster: Cluster) -> None:
    dead = cluster.upstreams[2]
    port = int(dead.url.rsplit(":", 1)[1])
    dead.kill()  # SIGKILL
    t0 = time.monotonic()
    for _ in range(12):  # right away: connect failures are retried on another replica
        status, _, headers = await post(cluster.url, chat())
        assert status == 200
        assert headers["x-pythia-replica"] != dead.url
    # every worker marks it down within 2 s (health checks every 0.25 s)
    while time.monotonic() - t0 < 5.0:
        m = await metrics_text(cluster.url)
        if f'pythia_replica_healthy{{pool="short",replica="{dead.url}"}} 0.0' in m:
            break
        await asyncio.sleep(0.1)
    assert f'pythia_replica_healthy{{pool="short",replica="{dead.url}"}} 0.0' in m
    assert time.monotonic() - t0 < 2.5
    assert 'reason="connect"' in m or "pythia_upstream_errors_total" in m
    # a new process on the same port is taken back once it is healthy
    start_fake_upstream(cluster.group, "c2", MODEL, port=port)
    deadline = time.monotonic() + 5.0
    seen: set[str] = set()
    while time.monotonic() < deadline and dead.url not in seen:
        _, _, headers = await post(cluster.url, chat())
        seen.add(headers["x-pythia-replica"])
    assert dead.url in seen


async def test_sigterm_finishes_inflight_stream_and_exits_0(procs: ProcessGroup) -> None:
    up = start_fake_upstream(procs, "slow", MODEL)
    pools = [{"name": "p", "max_context_tokens": 8192, "models": [MODEL], "replicas": [up.url]}]
    gw = start_gateway(procs, pools, workers=2, shutdown_grace_s=10)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(gw.url + "/v1/chat/completions", data=chat(stream=True, chunks=10, delay_s=0.1))
        assert resp.status == 200
        first = await resp.content.readany()
        gw.signal(signal.SIGTERM)
        rest = await resp.read()
    body = first + rest
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 11, (body, gw.log_text()[-3000:])
    assert gw.popen.wait(15) == 0, gw.log_text()[-3000:]
    assert http_status(gw.url + "/health") is None  # no longer listening
