"""Access control on real processes: API keys, admin key, rate limits shared by two gateways through a
real redis-server, and what the logs may and may not contain."""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest
import redis

from tests.conftest import Proc, ProcessGroup, free_port
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"
USER_KEY = "sk-user-3f9a1c77e0b24d5e"
OTHER_KEY = "sk-other-8d2e6b1f4a903c71"
ADMIN_KEY = "sk-admin-5b7c0e2d9f164a88"
PROMPT_MARK = "PROMPT-MARK-q7x"


def start_redis(group: ProcessGroup, port: int | None = None) -> Proc:
    """A throwaway redis-server on loopback (no persistence), ready when it accepts PING."""
    port = port or free_port()
    proc = group.start(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                       name="redis", url=f"redis://127.0.0.1:{port}/0")  # fmt: skip
    client = redis.Redis(port=port, socket_timeout=0.5)
    for _ in range(200):
        try:
            client.ping()
            return proc
        except redis.exceptions.ConnectionError:
            if not proc.alive():
                break
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@dataclass
class Cluster:
    upstream: Proc
    redis: Proc
    gateways: list[Proc]


@pytest.fixture(scope="module")
def cluster(module_procs: ProcessGroup) -> Iterator[Cluster]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    up = start_fake_upstream(module_procs, "a", MODEL)
    rd = start_redis(module_procs)
    pools = [{"name": "p", "max_context_tokens": 8192, "models": [MODEL], "replicas": [up.url]}]
    common = dict(
        api_keys=f"{USER_KEY},{OTHER_KEY}", admin_api_key=ADMIN_KEY, redis_url=rd.url, rate_limit_rpm=6,
        rate_limit_tpm=100_000, log_level="DEBUG",
    )  # fmt: skip
    # first gateway logs payloads, the second does not; both share the rate-limit buckets through Redis
    gws = [
        start_gateway(module_procs, pools, workers=1, ready_path="/health", log_payloads=True, **common),
        start_gateway(module_procs, pools, workers=1, ready_path="/health", log_payloads=False, **common),
    ]
    yield Cluster(up, rd, gws)


def chat(text: str = "hello", max_tokens: int = 4, stream: bool = False) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                         "stream": stream})  # fmt: skip


async def call(
    url: str, key: str | None, body: bytes | None = None, path: str = "/v1/chat/completions"
) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s:
        if body is None:
            async with s.get(url + path, headers=headers) as r:
                return r.status, await r.read(), dict(r.headers)
        async with s.post(url + path, data=body, headers=headers) as r:
            return r.status, await r.read(), dict(r.headers)


def assert_error(status: int, body: bytes, want_status: int, code: str) -> None:
    assert status == want_status, body
    err = orjson.loads(body)["error"]
    assert err["code"] == code and isinstance(err["message"], str) and err["type"]


async def test_api_keys_are_required_and_checked(cluster: Cluster) -> None:
    url = cluster.gateways[1].url
    for key in (None, "sk-wrong", USER_KEY[:-1], ADMIN_KEY):
        status, body, headers = await call(url, key, chat())
        assert_error(status, body, 401, "invalid_api_key")
        assert USER_KEY not in body.decode() and "Bearer" in headers.get("WWW-Authenticate", "")
    status, body, _ = await call(url, "sk-wrong", None, "/v1/models")
    assert_error(status, body, 401, "invalid_api_key")
    status, body, _ = await call(url, OTHER_KEY, chat())
    assert status == 200 and orjson.loads(body)["choices"]
    # the gateway terminated auth: the client's key never reaches the replica
    status, stats, _ = await call(cluster.upstream.url, None, None, "/debug/stats")
    forwarded = {k.lower(): v for k, v in orjson.loads(stats)["last_headers"].items()}
    assert status == 200 and forwarded and "authorization" not in forwarded
    for path in ("/health", "/ready", "/metrics"):  # probes and Prometheus need no key
        assert (await call(url, None, None, path))[0] == 200


async def test_admin_key_guards_pythia_endpoints(cluster: Cluster) -> None:
    url = cluster.gateways[0].url
    for key in (None, USER_KEY, "sk-wrong"):
        status, body, _ = await call(url, key, None, "/pythia/replicas")
        assert_error(status, body, 401, "invalid_api_key")
    status, body, _ = await call(url, ADMIN_KEY, None, "/pythia/replicas")
    assert status == 200 and orjson.loads(body)["pools"][0]["pool"] == "p"
    assert (await call(url, ADMIN_KEY, None, "/pythia/apps"))[0] == 200


async def test_loadgen_lists_replicas_behind_a_keyed_gateway(cluster: Cluster) -> None:
    from loadgen.scrape import discover_replicas

    url = cluster.gateways[0].url
    assert await discover_replicas(url) == []  # 401 without the admin key
    assert await discover_replicas(url, ADMIN_KEY) == [cluster.upstream.url]


async def test_request_limit_is_shared_by_two_gateways(cluster: Cluster) -> None:
    key = "sk-rl-" + "0" * 8  # not configured: 401 before any limit
    assert (await call(cluster.gateways[0].url, key, chat()))[0] == 401
    # USER_KEY has 6 requests a minute in total; 4 calls to each gateway: exactly 6 pass
    results = []
    for i in range(8):
        results.append(await call(cluster.gateways[i % 2].url, USER_KEY, chat(f"{PROMPT_MARK} {i}")))
    statuses = [s for s, _, _ in results]
    assert statuses.count(200) == 6 and statuses.count(429) == 2, statuses
    for status, body, headers in results:
        if status == 429:
            assert_error(status, body, 429, "rate_limit_exceeded")
            assert orjson.loads(body)["error"]["type"] == "rate_limit_error"
            assert 1 <= int(headers["Retry-After"]) <= 10  # one request refills in 10 s
    # another key has its own bucket
    assert (await call(cluster.gateways[1].url, OTHER_KEY, chat()))[0] == 200


async def test_token_limit_counts_prompt_and_max_tokens(procs: ProcessGroup) -> None:
    up = start_fake_upstream(procs, "t", MODEL)
    pools = [{"name": "p", "max_context_tokens": 100_000, "models": [MODEL], "replicas": [up.url]}]
    gw = start_gateway(procs, pools, workers=1, ready_path="/health", api_keys=USER_KEY, rate_limit_tpm=1000)
    assert (await call(gw.url, USER_KEY, chat(max_tokens=600)))[0] == 200
    status, body, headers = await call(gw.url, USER_KEY, chat(max_tokens=600))
    assert_error(status, body, 429, "rate_limit_exceeded")
    assert "tokens" in orjson.loads(body)["error"]["message"] and int(headers["Retry-After"]) >= 1
    assert (await call(gw.url, USER_KEY, chat(max_tokens=100)))[
        0
    ] == 200  # what is left still serves small calls


async def test_keys_never_logged_and_payloads_only_when_enabled(cluster: Cluster) -> None:
    for gw in cluster.gateways:
        for stream in (False, True):
            status, _, _ = await call(gw.url, OTHER_KEY, chat(f"{PROMPT_MARK} s{stream}", stream=stream))
            assert status in (200, 429)
        await call(
            gw.url, "sk-not-a-key-" + USER_KEY, chat()
        )  # failed attempts are not logged with the key either
    await asyncio.sleep(0.3)
    logged, silent = cluster.gateways[0].log_text(), cluster.gateways[1].log_text()
    for text in (logged, silent):
        for secret in (USER_KEY, OTHER_KEY, ADMIN_KEY):
            assert secret not in text
    assert PROMPT_MARK in logged and "a-w0" in logged  # the fake upstream's completion words
    assert PROMPT_MARK not in silent and "a-w0" not in silent


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("loopback process tests run on Linux")


async def test_redis_token_buckets_are_one_bucket_for_all_limiters(cluster: Cluster) -> None:
    from gateway.ratelimit import RateLimiter

    a = RateLimiter(0, 1000, redis_url=cluster.redis.url, key_prefix="t:", timeout_s=1.0)
    b = RateLimiter(0, 1000, redis_url=cluster.redis.url, key_prefix="t:", timeout_s=1.0)
    try:
        first = await a.take("k", 600)
        assert first.allowed and first.shared
        denied = await b.take("k", 600)  # the other limiter sees what the first one took
        assert not denied.allowed and denied.shared and denied.limit == "tokens"
        assert 10.0 < denied.retry_after_s <= 12.5  # 200 tokens short at 1000 a minute
        assert (await b.take("k", 300)).allowed and not (await a.take("k", 300)).allowed
        assert (
            await a.take("k2", 5000)
        ).allowed  # one call above the minute's budget passes on a full bucket
    finally:
        await a.close()
        await b.close()


async def test_hung_redis_costs_a_few_timeouts_then_nothing() -> None:
    from gateway.ratelimit import SLOW_CALLS_MEAN_DOWN, RateLimiter

    held: list[asyncio.StreamWriter] = []
    received = [0]

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts and reads, never answers: a hung (SIGSTOPped) Redis
        while chunk := await reader.read(65536):
            received[0] += len(chunk)

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r = RateLimiter(2, 0, redis_url=f"redis://127.0.0.1:{port}/0", timeout_s=0.1)
    try:
        verdicts = []
        for _ in range(SLOW_CALLS_MEAN_DOWN):  # each waits out the timeout, then decides locally
            verdicts.append(await r.take("k", 0))
        await asyncio.sleep(0.1)
        asked = received[0]
        assert asked > 0
        verdicts.append(await r.take("k", 0))  # now known down: decided here without asking Redis
        await asyncio.sleep(0.1)
        assert received[0] == asked
        assert [v.allowed for v in verdicts] == [True, True, False, False] and not any(
            v.shared for v in verdicts
        )
    finally:
        await r.close()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()
