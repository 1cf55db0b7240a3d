"""`pythia serve` with PYTHIA_DISCOVERY=k8s, end to end: a real gateway process (2 workers) finds its
replicas through a fake Kubernetes API on loopback and follows them as EndpointSlices change."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import VENV_BIN, ProcessGroup, free_port
from tests.integration.conftest import start_fake_upstream
from tests.integration.test_discovery_k8s_watch import NS, TOKEN, FakeK8s, make_slice

MODEL = "test-model"


def replica_slice(name: str, pool: str, url: str, ready: bool = True) -> dict[str, object]:
    """One EndpointSlice per fake upstream: all listen on 127.0.0.1, each on its own port."""
    port = int(url.rsplit(":", 1)[1])
    return make_slice(name, pool, [("127.0.0.1", ready)], port=port)


@pytest.fixture
async def fake_api() -> AsyncIterator[tuple[FakeK8s, str]]:
    fake = FakeK8s()
    app = web.Application()
    app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.drop_watches(abrupt=False)
        await runner.cleanup()


async def served_by(session: aiohttp.ClientSession, gateway: str) -> str:
    """Send one chat call through the gateway; the name of the fake upstream that answered it."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    async with session.post(f"{gateway}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        text = (await resp.json())["choices"][0]["message"]["content"]
    return text.split("-w", 1)[0]


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> None:
    """Wait (bounded) until `await check()` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_gateway_follows_endpoint_slices(
    fake_api: tuple[FakeK8s, str], procs: ProcessGroup, tmp_path: Path
) -> None:
    fake, api_url = fake_api
    # blocking starts (they wait for /health) happen before the gateway needs the fake API
    a, b, c = (start_fake_upstream(procs, n, MODEL) for n in ("a", "b", "c"))
    fake.upsert(replica_slice("short-a", "short", a.url))
    fake.upsert(replica_slice("short-b", "short", b.url, ready=False))  # scheduled, still loading
    fake.upsert(replica_slice("long-c", "long", c.url))
    token = tmp_path / "token"
    token.write_text(TOKEN)
    pools = [
        {"name": "short", "max_context_tokens": 16384, "models": [MODEL], "selector": "pythia.ai/pool=short", "port": "http"},
        {"name": "long", "max_context_tokens": 131072, "models": [MODEL], "selector": "pythia.ai/pool=long", "port": "http"},
    ]
    port = free_port()
    env = {
        "PYTHIA_HOST": "127.0.0.1", "PYTHIA_PORT": str(port), "PYTHIA_WORKERS": "2", "PYTHIA_LOG_LEVEL": "WARNING",
        "PYTHIA_POOLS": json.dumps(pools), "PYTHIA_DISCOVERY": "k8s", "PYTHIA_K8S_API_URL": api_url,
        "PYTHIA_K8S_NAMESPACE": NS, "PYTHIA_K8S_TOKEN_FILE": str(token), "PYTHIA_POLICY": "round_robin",
    }
    gw = procs.start([str(VENV_BIN / "pythia"), "serve"], env=env, name="gateway", url=f"http://127.0.0.1:{port}")

    # a new connection per call, so SO_REUSEPORT spreads calls over both workers
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=connector) as session:

        async def ready() -> bool:
            assert gw.alive(), gw.log_text()[-3000:]
            try:
                async with session.get(f"{gw.url}/ready") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready)
        # the not-ready pod gets nothing: every short call lands on a
        assert {await served_by(session, gw.url) for _ in range(6)} == {"a"}
        async def both_workers_watch() -> bool:  # one list + one watch per pool per worker
            return sum(k == "watch" for k, _ in fake.requests) >= 4

        await wait_until(both_workers_watch)

        # rollout: b turns ready, a starts terminating -> traffic moves to b in every worker
        fake.upsert(replica_slice("short-b", "short", b.url, ready=True))
        fake.upsert(replica_slice("short-a", "short", a.url, ready=False))

        async def only_b() -> bool:
            return {await served_by(session, gw.url) for _ in range(12)} == {"b"}

        await wait_until(only_b)

        # the watch history is compacted while the gateway is disconnected: it relists and still follows
        fake.drop_watches(abrupt=True)
        fake.delete("short-a")
        fake.upsert(replica_slice("short-a2", "short", a.url, ready=True))
        fake.compact()

        async def a_and_b() -> bool:
            return {await served_by(session, gw.url) for _ in range(8)} == {"a", "b"}

        await wait_until(a_and_b)
    assert gw.alive()
