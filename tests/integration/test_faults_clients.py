"""Clients that misbehave: one that never reads its stream, and thousands of idle connections.

Neither may hold up other clients, and the gateway's memory must stay bounded (backpressure
instead of buffering; a small fixed cost per idle connection).
"""

from __future__ import annotations

import asyncio
import resource
import socket
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import ProcessGroup
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"
IDLE_CONNECTIONS = 2000


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(autouse=True)
def enough_files() -> None:
    """Room for the idle connections here and in the gateway (it inherits our limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CONNECTIONS * 2 + 512
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"open-files hard limit {hard} < {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def normal_calls(url: str, n: int) -> list[int]:
    data = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:

        async def one() -> int:
            async with s.post(url + "/v1/chat/completions", data=data) as r:
                body = await r.read()
                return r.status if body.endswith(b"data: [DONE]\n\n") else -1

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def test_client_that_never_reads_does_not_hold_up_others(procs: ProcessGroup) -> None:
    up = start_fake_upstream(procs, "a", MODEL)
    pools = [{"name": "p", "max_context_tokens": 8192, "models": [MODEL], "replicas": [up.url]}]
    gw = start_gateway(procs, pools, workers=1)
    host, port = gw.url.removeprefix("http://").split(":")
    rss0 = rss_kib(gw.pid)
    # a ~30 MB stream to a client with a tiny receive buffer that never reads a byte
    body = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True,
                         "fake": {"chunks": 200_000}})  # fmt: skip
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect((host, int(port)))
    try:
        stuck.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        await asyncio.sleep(1.0)  # the gateway is blocked on this client's socket by now
        assert await normal_calls(gw.url, 30) == [200] * 30
        grown = rss_kib(gw.pid) - rss0
        print(f"slow-client RSS growth {grown} KiB")
        assert grown < 32 * 1024, f"gateway RSS grew {grown} KiB: the unread stream is being buffered"
    finally:
        stuck.close()
    assert await normal_calls(gw.url, 3) == [200] * 3


async def test_thousands_of_idle_connections_with_bounded_memory(procs: ProcessGroup) -> None:
    up = start_fake_upstream(procs, "a", MODEL)
    pools = [{"name": "p", "max_context_tokens": 8192, "models": [MODEL], "replicas": [up.url]}]
    gw = start_gateway(procs, pools, workers=1)
    host, port = gw.url.removeprefix("http://").split(":")
    assert (
        await normal_calls(gw.url, 4) == [200] * 4
    )  # warm: first-request allocations are not per connection
    rss0 = rss_kib(gw.pid)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(IDLE_CONNECTIONS // 100):
            conns = await asyncio.gather(*(asyncio.open_connection(host, int(port)) for _ in range(100)))
            writers.extend(w for _, w in conns)
        await asyncio.sleep(1.0)  # let the gateway accept them all
        assert await normal_calls(gw.url, 10) == [200] * 10  # still serves while they sit there
        assert len(list(Path(f"/proc/{gw.pid}/fd").iterdir())) >= IDLE_CONNECTIONS  # all accepted, all open
        per_conn = (rss_kib(gw.pid) - rss0) * 1024 / IDLE_CONNECTIONS
        print(f"idle: {per_conn:.0f} B per connection")
        assert per_conn < 24 * 1024, f"{per_conn:.0f} bytes of gateway RSS per idle connection"
        assert all(not w.is_closing() for w in writers)
    finally:
        for w in writers:
            w.close()
    await asyncio.sleep(0.5)
    assert await normal_calls(gw.url, 3) == [200] * 3
