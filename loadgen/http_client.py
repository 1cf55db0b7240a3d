"""A lean HTTP/1.1 client for the open-loop driver: asyncio protocols + httptools, keep-alive pool.

aiohttp's client costs several hundred microseconds of CPU per streamed request (URL objects,
header defaults, a readline per SSE line); at thousands of requests per second that makes the
load generator the bottleneck. Here each request is one socket write, the answer is parsed by
llhttp (httptools) as bytes arrive, and SSE events are timed per network read inside the
protocol callback, so a request costs one awaited future.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools


class HttpFailure(Exception):
    """A request failed before a complete answer; `kind` is the error name recorded for it."""

    def __init__(self, kind: str, message: str = "") -> None:
        super().__init__(message or kind)
        self.kind = kind


class Sink:
    """Receives one response: status and headers, then body bytes with their arrival time."""

    __slots__ = ()

    def headers(self, status: int, headers: dict[bytes, bytes]) -> None: ...

    def body(self, data: bytes, now: float) -> None: ...


class _Conn(asyncio.Protocol):
    __slots__ = ("_headers", "_loop", "_now", "_parser", "_pool", "done", "keep", "sink", "transport")

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._loop = pool.loop
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.sink: Sink | None = None
        self.done: asyncio.Future[None] | None = None
        self._headers: dict[bytes, bytes] = {}
        self.keep = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._now = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HttpFailure("invalid_response", "unexpected protocol upgrade"))
        except httptools.HttpParserError as e:
            self._fail(HttpFailure("invalid_response", str(e)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.keep = False
        self._fail(HttpFailure("disconnect", str(exc) if exc else "server closed the connection"))
        self._pool.forget(self)

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        if self.sink is not None:
            self.sink.headers(self._parser.get_status_code(), self._headers)
        self.keep = self._parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.sink.body(body, self._now)

    def on_message_complete(self) -> None:
        done, self.done, self.sink = self.done, None, None
        self._headers = {}
        if done is not None and not done.done():
            done.set_result(None)

    # ours
    def start(self, payload: bytes, sink: Sink) -> asyncio.Future[None]:
        self.sink = sink
        self.done = self._loop.create_future()
        assert self.transport is not None
        self.transport.write(payload)
        return self.done

    def _fail(self, err: HttpFailure) -> None:
        done, self.done, self.sink = self.done, None, None
        if done is not None and not done.done():
            done.set_exception(err)
        self.keep = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self._fail(HttpFailure("cancelled"))


class ConnectionPool:
    """Keep-alive connections to one origin; `request()` sends one request and streams its answer to a sink."""

    def __init__(self, base_url: str, connect_timeout_s: float = 10.0, max_connections: int = 0) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"target must be an http(s) URL, got {base_url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        default_port = (u.scheme == "https" and self.port == 443) or (u.scheme == "http" and self.port == 80)
        self.host_header = (self.host if default_port else f"{self.host}:{self.port}").encode()
        self.connect_timeout_s = connect_timeout_s
        self.loop = asyncio.get_running_loop()
        self._idle: deque[_Conn] = deque()
        self._all: set[_Conn] = set()
        self._limit = asyncio.Semaphore(max_connections) if max_connections > 0 else None
        self.opened = 0

    def forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    async def _acquire(self) -> _Conn:
        while self._idle:
            c = self._idle.pop()
            if c.transport is not None and not c.transport.is_closing():
                return c
        factory: Callable[[], _Conn] = lambda: _Conn(self)  # noqa: E731
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(factory, self.host, self.port, ssl=self.ssl), self.connect_timeout_s
            )
        except TimeoutError:
            raise HttpFailure("connect_timeout", f"no connection to {self.host}:{self.port} within "
                                                 f"{self.connect_timeout_s}s") from None
        except OSError as e:
            raise HttpFailure("connect", str(e)) from None
        self.opened += 1
        self._all.add(proto)
        return proto

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes, sink: Sink,
                      timeout_s: float) -> None:
        """Send one request; returns when the whole answer was fed to `sink`; raises HttpFailure."""
        if self._limit is not None:
            await self._limit.acquire()
        try:
            conn = await self._acquire()
            head = [f"{method} {path} HTTP/1.1\r\n".encode(), b"Host: ", self.host_header,
                    b"\r\nContent-Length: ", str(len(body)).encode(), b"\r\n"]
            for k, v in headers.items():
                head.append(f"{k}: {v}\r\n".encode("latin-1", "replace"))
            head.append(b"\r\n")
            head.append(body)
            fut = conn.start(b"".join(head), sink)
            timer = self.loop.call_later(timeout_s, _timeout, conn, fut)
            try:
                await fut
            except asyncio.CancelledError:
                conn.abort()
                raise
            finally:
                timer.cancel()
            if conn.keep and conn.transport is not None and not conn.transport.is_closing():
                self._idle.append(conn)
            else:
                self.forget(conn)
                if conn.transport is not None:
                    conn.transport.close()
        finally:
            if self._limit is not None:
                self._limit.release()

    def close(self) -> None:
        for c in list(self._all):
            if c.transport is not None:
                c.transport.close()
        self._all.clear()
        self._idle.clear()


def _timeout(conn: _Conn, fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        conn._fail(HttpFailure("timeout", "request timed out"))
