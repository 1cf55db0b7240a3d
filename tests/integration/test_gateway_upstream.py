"""The hot-path upstream client against a raw loopback server: keep-alive reuse, stale connections,
large bodies, chunked answers, timeouts and abandoning an answer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.upstream import ConnectFailed, Disconnected, ReadTimeout, ReplicaPool, request_head

Handler = Callable[[bytes, bytes, asyncio.StreamWriter], "asyncio.Future[None] | None"]


class RawServer:
    """Reads HTTP/1.1 requests with Content-Length; answers with what `respond` writes."""

    def __init__(self) -> None:
        self.connections = 0
        self.bodies: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self.respond: Callable[[bytes, bytes, asyncio.StreamWriter], object] = self.ok
        self.close_after_each = False

    @staticmethod
    def ok(head: bytes, body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}")

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        n = int(line.split(b":")[1])
                body = await r.readexactly(n)
                self.bodies.append(body)
                res = self.respond(head, body, w)
                if asyncio.iscoroutine(res):
                    await res
                await w.drain()
                if self.close_after_each:
                    w.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_peer.set()
        finally:
            w.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[RawServer, str]]:
    rs = RawServer()
    srv = await asyncio.start_server(rs.handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield rs, f"http://127.0.0.1:{port}"
    srv.close()


async def call(pool: ReplicaPool, body: bytes = b"{}", timeout: float = 5.0) -> tuple[int, bytes]:
    head = request_head(b"POST", b"/v1/chat/completions", pool.host_header, len(body), b"Content-Type: application/json\r\n")
    resp = await pool.request(head, body, timeout)
    try:
        return resp.status, await resp.read_all()
    finally:
        resp.close()


async def test_keep_alive_connections_are_reused(server: tuple[RawServer, str]) -> None:
    rs, url = server
    pool = ReplicaPool(url, 1.0, 30.0)
    for _ in range(5):
        assert await call(pool) == (200, b'{"ok":true}')
    assert rs.connections == 1
    # concurrent calls open more connections, which are then all reused
    await asyncio.gather(*(call(pool) for _ in range(3)))
    await asyncio.gather(*(call(pool) for _ in range(3)))
    assert rs.connections == 3
    pool.close()


async def test_max_connections_makes_calls_wait_for_a_free_one(server: tuple[RawServer, str]) -> None:
    rs, url = server

    async def slow(head: bytes, body: bytes, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.1)
        RawServer.ok(head, body, w)

    rs.respond = slow
    pool = ReplicaPool(url, 1.0, 30.0, max_connections=2)
    results = await asyncio.gather(*(call(pool) for _ in range(6)))
    assert all(r == (200, b'{"ok":true}') for r in results)
    assert rs.connections == 2
    pool.close()


async def test_a_connection_the_upstream_closed_is_replaced(server: tuple[RawServer, str]) -> None:
    rs, url = server
    rs.close_after_each = True  # like an engine whose keep-alive expired
    pool = ReplicaPool(url, 1.0, 30.0)
    for _ in range(3):
        assert (await call(pool))[0] == 200
    assert rs.connections == 3
    pool.close()


async def test_large_request_and_chunked_response_bodies_arrive_intact(server: tuple[RawServer, str]) -> None:
    rs, url = server
    big = b'{"prompt":"' + b"x" * 3_000_000 + b'"}'
    chunks = [bytes([65 + i % 26]) * 70_000 for i in range(40)]

    async def chunked(head: bytes, body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for c in chunks:
            w.write(b"%x\r\n%s\r\n" % (len(c), c))
            await w.drain()
        w.write(b"0\r\n\r\n")

    rs.respond = chunked
    pool = ReplicaPool(url, 1.0, 30.0)
    head = request_head(b"POST", b"/x", pool.host_header, len(big), b"")
    resp = await pool.request(head, big, 5.0)
    got = []
    while (c := await resp.next_chunk()) is not None:
        got.append(c)
        await asyncio.sleep(0.001)  # a slow reader: the client pauses the socket instead of buffering it all
    resp.close()
    assert rs.bodies[-1] == big
    assert b"".join(got) == b"".join(chunks)
    assert (await call(pool))[0] == 200 and rs.connections == 1  # and the connection is reused after
    pool.close()


async def test_silence_past_the_read_timeout_fails_the_call(server: tuple[RawServer, str]) -> None:
    rs, url = server

    async def never(head: bytes, body: bytes, w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    rs.respond = never
    pool = ReplicaPool(url, 1.0, 30.0)
    with pytest.raises(ReadTimeout):
        await call(pool, timeout=0.2)
    pool.close()


async def test_abandoning_an_answer_closes_its_connection(server: tuple[RawServer, str]) -> None:
    rs, url = server

    async def slow_stream(head: bytes, body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(100):
            w.write(b"6\r\ndata: \r\n")
            await w.drain()
            await asyncio.sleep(0.02)

    rs.respond = slow_stream
    pool = ReplicaPool(url, 1.0, 30.0)
    head = request_head(b"POST", b"/x", pool.host_header, 2, b"")
    resp = await pool.request(head, b"{}", 5.0)
    assert await resp.next_chunk()
    resp.close()
    await asyncio.wait_for(rs.closed_by_peer.wait(), 3.0)
    pool.close()


async def test_a_body_ended_by_closing_the_connection_is_complete(server: tuple[RawServer, str]) -> None:
    rs, url = server

    def close_delimited(head: bytes, body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"a\":1}")
        w.close()

    rs.respond = close_delimited
    pool = ReplicaPool(url, 1.0, 30.0)
    assert await call(pool) == (200, b'{"a":1}')
    pool.close()


async def test_refused_and_mid_answer_failures_are_typed(server: tuple[RawServer, str]) -> None:
    rs, url = server
    dead = ReplicaPool("http://127.0.0.1:1", 0.5, 30.0)
    with pytest.raises(ConnectFailed) as e:
        await call(dead)
    assert e.value.conclusive

    def cut(head: bytes, body: bytes, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        w.close()

    rs.respond = cut
    pool = ReplicaPool(url, 1.0, 30.0)
    with pytest.raises(Disconnected):
        await call(pool)
    pool.close()
