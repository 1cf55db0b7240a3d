"""`pythia serve`'s fast server path (gateway/fastpath.py) as a client sees it, byte by byte on raw sockets.

Keep-alive reuse, pipelining, chunked and large request bodies, Expect: 100-continue, HTTP/1.0,
malformed requests, a connection handed to aiohttp for other endpoints and back, byte-identical
streams, API-key middleware applied on the fast path, and the aiohttp-only mode (PYTHIA_FAST_PATH=0).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import orjson
import pytest

from tests.conftest import Proc, ProcessGroup
from tests.integration.conftest import start_fake_upstream, start_gateway

MODEL = "test-model"
BODY_LIMIT = 1_000_000
KEY = "sk-fastpath-test"
TIMEOUT = 10.0


@dataclass
class Setup:
    gateway: Proc
    plain: Proc  # PYTHIA_FAST_PATH=0: every request through aiohttp
    keyed: Proc  # PYTHIA_API_KEYS set: the access middleware must run on the fast path too
    upstream: Proc


@pytest.fixture(scope="module")
def setup(module_procs: ProcessGroup) -> Iterator[Setup]:
    up = start_fake_upstream(module_procs, "solo", MODEL)
    pools = [{"name": "short", "max_context_tokens": 4_000_000, "models": [MODEL], "replicas": [up.url]}]
    gw = start_gateway(module_procs, pools, workers=2, policy="round_robin", body_limit_bytes=BODY_LIMIT)
    plain = start_gateway(module_procs, pools, workers=1, policy="round_robin", fast_path=False)
    keyed = start_gateway(module_procs, pools, workers=1, policy="round_robin", api_keys=KEY)
    yield Setup(gw, plain, keyed, up)


def chat(content: str = "hello", stream: bool = False, **extra: object) -> bytes:
    return orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "stream": stream, **extra})


def request(body: bytes, path: str = "/v1/chat/completions", extra: str = "", version: str = "1.1") -> bytes:
    head = f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + extra + "\r\n").encode() + body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes  # de-chunked


async def read_answer(r: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 response: by Content-Length, chunked, or until the connection closes."""
    line = await r.readline()
    status = int(line.split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while (h := await r.readline()) not in (b"\r\n", b""):
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    if status == 100:
        return Answer(status, headers, b"")
    if "content-length" in headers:
        return Answer(status, headers, await r.readexactly(int(headers["content-length"])))
    if headers.get("transfer-encoding") == "chunked":
        parts = []
        while True:
            size = int((await r.readline()).split(b";")[0], 16)
            if size == 0:
                await r.readline()
                break
            parts.append(await r.readexactly(size))
            await r.readexactly(2)
        return Answer(status, headers, b"".join(parts))
    return Answer(status, headers, await r.read())


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def upstream_saw(s: Setup) -> dict[str, object]:
    async with aiohttp.ClientSession() as c, c.get(s.upstream.url + "/debug/stats") as r:
        stats: dict[str, object] = await r.json()
        return stats


async def upstream_sent(s: Setup) -> bytes:
    async with aiohttp.ClientSession() as c, c.get(s.upstream.url + "/debug/last_response") as r:
        return await r.read()


async def test_keep_alive_connection_serves_many_calls_and_forwards_exact_bytes(setup: Setup) -> None:
    r, w = await connect(setup.gateway.url)
    try:
        for i in range(5):
            body = chat(f"call {i}", stream=i % 2 == 1)
            w.write(request(body))
            a = await asyncio.wait_for(read_answer(r), TIMEOUT)
            assert a.status == 200
            assert (await upstream_saw(setup))["last_body"] == body.decode()  # untagged body: the bytes received
            assert a.body == await upstream_sent(setup)  # streamed or not: the upstream's bytes, unchanged
            if i % 2:
                assert a.headers["content-type"].startswith("text/event-stream")
                assert a.body.endswith(b"data: [DONE]\n\n")
    finally:
        w.close()


async def test_pipelined_requests_are_answered_in_order(setup: Setup) -> None:
    r, w = await connect(setup.gateway.url)
    try:
        w.write(request(chat("one")) + request(chat("two", stream=True)) + request(orjson.dumps({"model": MODEL, "prompt": "three"}), "/v1/completions"))
        answers = [await asyncio.wait_for(read_answer(r), TIMEOUT) for _ in range(3)]
        assert [a.status for a in answers] == [200, 200, 200]
        assert b"chat.completion\"" in answers[0].body
        assert answers[1].body.endswith(b"data: [DONE]\n\n")
        assert b"text_completion" in answers[2].body
    finally:
        w.close()


async def test_chunked_request_body_split_across_sends(setup: Setup) -> None:
    body = chat("chunked " * 50)
    parts = [body[:10], body[10:300], body[300:]]
    r, w = await connect(setup.gateway.url)
    try:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for p in parts:
            await asyncio.sleep(0.02)
            w.write(b"%x;ext=1\r\n%s\r\n" % (len(p), p))
        w.write(b"0\r\n\r\n")
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 200
        assert (await upstream_saw(setup))["last_body"] == body.decode()
        w.write(request(chat("after chunked")))  # the connection is still in step
        assert (await asyncio.wait_for(read_answer(r), TIMEOUT)).status == 200
    finally:
        w.close()


async def test_large_body_in_pieces_and_over_the_limit(setup: Setup) -> None:
    big = chat("y" * (BODY_LIMIT - 200))
    assert len(big) <= BODY_LIMIT
    r, w = await connect(setup.gateway.url)
    try:
        data = request(big)
        for i in range(0, len(data), 65536):
            w.write(data[i : i + 65536])
            await w.drain()
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 200
        assert len(str((await upstream_saw(setup))["last_body"])) == len(big)
    finally:
        w.close()
    r, w = await connect(setup.gateway.url)
    try:
        w.write(request(chat("z" * BODY_LIMIT)))
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 413
        assert orjson.loads(a.body)["error"]["code"] == "request_too_large"
    finally:
        w.close()


async def test_expect_continue_and_http10(setup: Setup) -> None:
    r, w = await connect(setup.gateway.url)
    try:
        body = chat("expect")
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n" % len(body))
        w.write(b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert interim.status == 100
        w.write(body)
        assert (await asyncio.wait_for(read_answer(r), TIMEOUT)).status == 200
    finally:
        w.close()
    r, w = await connect(setup.gateway.url)
    try:  # HTTP/1.0: no chunked encoding; the stream ends when the connection closes
        w.write(request(chat("old client", stream=True), version="1.0"))
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 200 and "transfer-encoding" not in a.headers
        assert a.body == await upstream_sent(setup)
    finally:
        w.close()


async def test_malformed_request_gets_openai_error(setup: Setup) -> None:
    r, w = await connect(setup.gateway.url)
    try:
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nContent-Length: 3\r\n\r\nabc")
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 400
        assert orjson.loads(a.body)["error"]["type"] == "invalid_request_error"
    finally:
        w.close()
    r, w = await connect(setup.gateway.url)
    try:
        w.write(request(b"{not json"))
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 400 and orjson.loads(a.body)["error"]["code"] == "invalid_json"
    finally:
        w.close()


async def test_other_endpoints_on_the_same_connection_are_served_by_aiohttp(setup: Setup) -> None:
    r, w = await connect(setup.gateway.url)
    try:
        w.write(request(chat("first")))
        assert (await asyncio.wait_for(read_answer(r), TIMEOUT)).status == 200
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 200 and orjson.loads(a.body) == {"status": "ok"}
        w.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        assert orjson.loads((await asyncio.wait_for(read_answer(r), TIMEOUT)).body)["data"][0]["id"] == MODEL
        w.write(request(chat("after hand-off", stream=True)))  # completions still work once aiohttp has the connection
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 200 and a.body == await upstream_sent(setup)
        w.write(b"GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(read_answer(r), TIMEOUT)).status == 405
    finally:
        w.close()


async def test_api_key_middleware_runs_on_the_fast_path(setup: Setup) -> None:
    r, w = await connect(setup.keyed.url)
    try:
        w.write(request(chat("no key")))
        a = await asyncio.wait_for(read_answer(r), TIMEOUT)
        assert a.status == 401 and orjson.loads(a.body)["error"]["code"] == "invalid_api_key"
        w.write(request(chat("with key"), extra=f"Authorization: Bearer {KEY}\r\n"))
        assert (await asyncio.wait_for(read_answer(r), TIMEOUT)).status == 200
    finally:
        w.close()


async def test_aiohttp_only_mode_gives_the_same_answers(setup: Setup) -> None:
    for url in (setup.gateway.url, setup.plain.url):
        r, w = await connect(url)
        try:
            w.write(request(chat("same", stream=True)))
            a = await asyncio.wait_for(read_answer(r), TIMEOUT)
            assert a.status == 200 and a.body == await upstream_sent(setup)
            w.write(request(b"[1]"))
            a = await asyncio.wait_for(read_answer(r), TIMEOUT)
            assert a.status == 400 and orjson.loads(a.body)["error"]["code"] == "invalid_request"
        finally:
            w.close()
