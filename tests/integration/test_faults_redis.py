"""Redis SIGKILLed and restarted under load: no request fails because of it, and learning resumes.

The gateway uses Redis for the shared predictor store and for shared rate-limit buckets; both
must degrade to in-process state while Redis is gone and pick Redis up again when it is back.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import ProcessGroup
from tests.integration.conftest import start_fake_upstream, start_gateway
from tests.integration.test_access_gateway import start_redis

MODEL = "test-model"
APP = "faultapp"
ROLES = ("planner", "searcher", "writer")
FAST = {"flush_interval_s": 0.05, "refresh_interval_s": 0.1, "redis_timeout_s": 0.3, "workflow_idle_s": 1.0}

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


async def model_calls(s: aiohttp.ClientSession, url: str) -> int:
    async with s.get(f"{url}/pythia/apps/{APP}/model") as r:
        if r.status != 200:
            return 0
        model = await r.json()
    return sum(int(role["calls"]) for role in model["roles"].values())


async def test_redis_killed_and_restarted_under_load(procs: ProcessGroup) -> None:
    up = start_fake_upstream(procs, "a", MODEL)
    rd = start_redis(procs)
    port = int(rd.url.rsplit(":", 1)[1].split("/")[0])
    pools = [{"name": "p", "max_context_tokens": 8192, "models": [MODEL], "replicas": [up.url]}]
    gw = start_gateway(
        procs,
        pools,
        workers=2,
        redis_url=rd.url,
        predictor_options=json.dumps(FAST),
        rate_limit_rpm=1_000_000,
    )
    statuses: list[int] = []
    stop = asyncio.Event()

    async def workflows(s: aiohttp.ClientSession, worker: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            for role in ROLES:
                headers = {"X-Pythia-App": APP, "X-Pythia-Workflow": f"w{worker}-{n}", "X-Pythia-Agent": role}
                data = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": f"{role} step"}],
                                     "max_tokens": 8, "stream": role == "writer", "fake": {"delay_s": 0.01}})  # fmt: skip
                async with s.post(gw.url + "/v1/chat/completions", data=data, headers=headers) as r:
                    body = await r.read()
                    statuses.append(r.status)
                    assert r.status == 200, body
                    assert r.headers.get("Content-Type", "").startswith(
                        ("application/json", "text/event-stream")
                    )

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        load = [asyncio.create_task(workflows(s, i)) for i in range(6)]
        await asyncio.sleep(2.0)
        before_kill = len(statuses)
        rd.kill()  # SIGKILL: every cached connection breaks, new ones are refused
        await asyncio.sleep(1.5)
        during_outage = len(statuses) - before_kill
        rd2 = start_redis(procs, port=port)  # empty: the gateways fill it again
        restarted_at_calls = await model_calls(s, gw.url)
        await asyncio.sleep(2.5)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*load), 30)
        after_calls = await model_calls(s, gw.url)
    assert during_outage > 20  # requests kept flowing while Redis was gone
    assert statuses and set(statuses) == {200}, {st: statuses.count(st) for st in set(statuses)}
    assert after_calls > restarted_at_calls > 0  # the model keeps learning
    client = aioredis.Redis.from_url(rd2.url, decode_responses=True)
    try:
        deadline = time.monotonic() + 5
        while APP not in await client.smembers("pythia:apps") and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert APP in await client.smembers("pythia:apps")  # the restarted Redis learns the app again
        assert await client.exists(f"pythia:model:{APP}")
        assert [k async for k in client.scan_iter("pythia:rl:*")]  # rate-limit buckets are shared again
    finally:
        await client.aclose()
    log = gw.log_text()
    assert "Traceback" not in log, log[-3000:]
