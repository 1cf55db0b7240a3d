"""`pythia serve` (2 workers, session policy) in front of three simulated vLLM engines (`pythia sim-engine`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import orjson
import pytest

from tests.conftest import VENV_BIN, Proc, ProcessGroup, free_port
from tests.integration.conftest import start_gateway

MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def gateway(module_procs: ProcessGroup) -> Iterator[Proc]:
    engines = []
    for i in range(3):
        port = free_port()
        engines.append(
            module_procs.start(
                [str(VENV_BIN / "pythia"), "sim-engine", "--port", str(port), "--time-scale", "20", "--seed", str(i)],
                name=f"sim-{i}", url=f"http://127.0.0.1:{port}", ready_path="/health",
            )
        )  # fmt: skip
    pools = [{"name": "short", "max_context_tokens": 32768, "models": [MODEL], "replicas": [e.url for e in engines]}]
    yield start_gateway(module_procs, pools, workers=2, policy="session", routing_headers=True)


def body(content: str, stream: bool, max_tokens: int = 8) -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "system", "content": "You are a research planner."}, {"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "stream": stream,
            "stream_options": {"include_usage": True} if stream else None,
        }
    )


async def post(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/chat/completions", data=data, headers=headers) as r:
        return r.status, await r.read(), dict(r.headers)


async def test_streamed_and_plain_chat_through_simulated_engines(gateway: Proc) -> None:
    status, raw, headers = await post(gateway.url, body("hello", True), {"X-Pythia-Session": "s-stream"})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]"
    usage = orjson.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == 8
    status, raw, _ = await post(gateway.url, body("hello", False), {})
    assert status == 200 and orjson.loads(raw)["usage"]["completion_tokens"] == 8


async def test_a_session_keeps_its_replica_and_its_prefix_cache(gateway: Proc) -> None:
    prompt = "Research question: " + " ".join(f"fact{i}" for i in range(600))
    replicas, cached = set(), []
    for _ in range(3):
        status, raw, headers = await post(gateway.url, body(prompt, False), {"X-Pythia-Session": "s-cache"})
        assert status == 200
        replicas.add(headers["x-pythia-replica"])
        cached.append(orjson.loads(raw)["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(replicas) == 1
    assert cached[0] == 0 and cached[1] > 1000 and cached[2] > 1000


async def test_the_gateway_scrapes_engine_metrics(gateway: Proc) -> None:
    deadline = time.monotonic() + 5.0
    while True:
        async with aiohttp.ClientSession() as s, s.get(gateway.url + "/pythia/replicas") as r:
            view = await r.json()
        reps = view["pools"][0]["replicas"]
        scraped = all(x["kv_capacity_tokens"] > 0 for x in reps) and sum(x["prefix_cache_queries"] for x in reps) > 0
        if scraped or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert all(x["healthy"] and x["kv_capacity_tokens"] > 100_000 for x in reps)
    assert sum(x["prefix_cache_queries"] for x in reps) > 0
