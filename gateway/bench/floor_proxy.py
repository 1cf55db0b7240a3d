"""The least a Python proxy can do per request: a benchmark floor, not a gateway.

Raw uvloop protocols on both sides, round-robin over keep-alive upstream connections, and just
enough HTTP/1.1 to find where each message ends (Content-Length, or the chunked terminator): no
routing, no JSON, no tags, no metrics, no error handling beyond closing the connection. Its CPU per
request and added latency are what CPython + uvloop cost for relaying the benchmark's bytes, so they
bound from below what any Python gateway (ours included) can reach on the same machine.
Usage: `python -m gateway.bench.floor_proxy --port P --upstream http://127.0.0.1:U [...] [--processes 2]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from collections import deque

import uvloop

_CHUNKED_END = b"0\r\n\r\n"


def _body_framing(head: bytes) -> tuple[int, bool]:
    """(Content-Length, chunked) of a message head (its bytes up to the blank line)."""
    low = head.lower()
    i = low.find(b"\r\ncontent-length:")
    if i >= 0:
        j = low.find(b"\r\n", i + 2)
        return int(low[i + 17 : j if j >= 0 else len(low)]), False
    return 0, b"\r\ntransfer-encoding: chunked" in low


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to a replica; relays each answer to the client that asked."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.client: _Client | None = None
        self.buf = b""
        self.need = -1  # body bytes still expected (-1: reading the head; -2: chunked)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        client.transport.write(data)  # first byte forwarded as soon as it arrives
        if self.need == -1:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length, chunked = _body_framing(self.buf[:end])
            rest = self.buf[end + 4 :]
            self.buf = b""
            if chunked:
                self.need = -2
                data = rest
            else:
                self.need = length - len(rest)
                if self.need <= 0:
                    self._done()
                return
        if self.need == -2:
            self.buf = (self.buf + data)[-5:]
            if self.buf == _CHUNKED_END:
                self._done()
        else:
            self.need -= len(data)
            if self.need <= 0:
                self._done()

    def _done(self) -> None:
        client, self.client, self.need, self.buf = self.client, None, -1, b""
        self.pool.idle.append(self)
        if client is not None:
            client.answered()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.client is not None:
            self.client.transport.close()


class _Pool:
    """Idle keep-alive connections to one upstream."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: deque[_Upstream] = deque()


class _Client(asyncio.Protocol):
    """One client connection: frame each request, send it to the next upstream, relay the answer."""

    def __init__(self, pools: list[_Pool], turn: list[int]) -> None:
        self.pools = pools
        self.connecting: set[asyncio.Task[None]] = set()
        self.turn = turn
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = b""
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length, _ = _body_framing(self.buf[:end])
        total = end + 4 + length
        if len(self.buf) < total:
            return
        request, self.buf = self.buf[:total], self.buf[total:]
        self.busy = True
        pool = self.pools[self.turn[0] % len(self.pools)]
        self.turn[0] += 1
        if pool.idle:
            self._send(pool.idle.pop(), request)
        else:
            task = asyncio.ensure_future(self._connect_and_send(pool, request))
            self.connecting.add(task)
            task.add_done_callback(self.connecting.discard)

    async def _connect_and_send(self, pool: _Pool, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(lambda: _Upstream(pool), pool.host, pool.port)
        self._send(up, request)

    def _send(self, up: _Upstream, request: bytes) -> None:
        up.client = self
        assert up.transport is not None
        up.transport.write(request)

    def answered(self) -> None:
        self.busy = False
        if self.buf:
            self._next()


async def serve(host: str, port: int, upstreams: list[str]) -> None:
    pools = []
    for u in upstreams:
        h, _, p = u.removeprefix("http://").rstrip("/").rpartition(":")
        pools.append(_Pool(h, int(p)))
    turn = [0]
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    server = await loop.create_server(lambda: _Client(pools, turn), sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", action="append", required=True)
    p.add_argument("--processes", type=int, default=2, help="processes sharing the port (SO_REUSEPORT)")
    a = p.parse_args(argv)
    for _ in range(a.processes - 1):
        if os.fork() == 0:
            break
    uvloop.run(serve(a.host, a.port, a.upstream))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
