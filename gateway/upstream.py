"""Upstream HTTP/1.1 client for the hot path: asyncio protocols + httptools, a keep-alive pool per replica.

aiohttp's client does much per request that a proxy does not need (cookie jar, redirects,
URL objects, header defaults, tracing hooks); this one writes the request in one send,
parses the answer with llhttp (httptools) and hands body bytes to the caller as they
arrive. TCP_NODELAY is set on every connection; a slow client pauses reading from the
upstream (bounded memory per stream); closing an unfinished response closes its
connection, which is how vLLM learns that the client went away.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

READ_HIGH_WATER = 256 * 1024  # buffered, unread body bytes at which we stop reading the socket


class UpstreamError(Exception):
    """An upstream exchange failed; `kind` names how (for metrics), `conclusive` = the replica is down."""

    kind = "error"

    def __init__(self, message: str, conclusive: bool = False) -> None:
        super().__init__(message)
        self.conclusive = conclusive


class ConnectFailed(UpstreamError):
    kind = "connect"


class ConnectTimeout(UpstreamError):
    kind = "connect_timeout"


class ReadTimeout(UpstreamError):
    kind = "read_timeout"


class Disconnected(UpstreamError):
    kind = "disconnect"


class UpstreamResponse:
    """One answer being received: status and headers first, then body chunks as they arrive."""

    __slots__ = (
        "_buffered", "_chunks", "_collect", "_conn", "_error", "_paused", "_read_timeout", "_waiter", "complete",
        "got_bytes", "headers_done", "on_event", "raw_headers", "status",
    )  # fmt: skip

    def __init__(self, conn: _Conn, read_timeout: float) -> None:
        self._conn: _Conn | None = conn
        self._read_timeout = read_timeout
        self.status = 0
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.got_bytes = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._collect = False  # read_all: take everything, never pause the socket
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        # instead of a waiting coroutine, a callback may follow the answer (gateway.exchange): it runs on each
        # event (headers, body bytes, the end, a failure) and the read timeout watches it until it is unset
        self.on_event: Callable[[], None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first header with this lower-case name, or None."""
        for k, v in self.raw_headers:
            if k.lower() == name:
                return v
        return None

    @property
    def at_end(self) -> bool:
        """The whole answer has arrived and the caller has taken all of it."""
        return self.complete and not self._chunks

    # -- consumer side ---------------------------------------------------------------------------
    async def wait_headers(self) -> None:
        while not self.headers_done:
            await self._wait()

    async def read_all(self) -> bytes:
        """The whole body (for non-streamed answers)."""
        self.collect()
        while not self.complete:
            await self._wait()
        return self.take_all()

    def take_all(self) -> bytes:
        """The whole body of an answer that is `complete` (no waiting)."""
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        return data

    def collect(self) -> None:
        """Keep reading until the end without pausing the socket (a whole answer is wanted)."""
        self._collect = True
        self.resume()

    async def next_chunk(self) -> bytes | None:
        """The body bytes received since the last call (waiting for some), or None at the end."""
        while not self._chunks:
            if self.complete:
                return None
            await self._wait()
        if len(self._chunks) == 1:
            data = self._chunks.pop()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered = 0
        self.resume()
        return data

    def resume(self) -> None:
        """Read the upstream again after `pause` (or the high-water pause)."""
        if self._paused:
            self._paused = False
            conn = self._conn
            if conn is not None and conn.transport is not None and not conn.closed:
                conn.transport.resume_reading()

    def close(self) -> None:
        """Done with this answer: an unfinished one closes its connection (the upstream sees the client leave)."""
        conn = self._conn
        self._conn = None
        if conn is not None and not self.complete:
            conn.abort()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        conn = self._conn
        # the connection's loop: asyncio.get_running_loop() makes a getpid() system call (CPython 3.11)
        loop = conn.loop if conn is not None and conn.loop is not None else asyncio.get_running_loop()
        fut = self._waiter = loop.create_future()
        if conn is not None and conn.loop is loop:
            # the connection's one lazily re-armed timer watches this wait (no timer made per wait)
            conn.watch(self._read_timeout)
            try:
                await fut
            finally:
                self._waiter = None
            return
        timer = loop.call_later(self._read_timeout, self._on_timeout, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None
        # callers loop on their condition; an error set meanwhile is raised by the next call

    def _on_timeout(self, fut: asyncio.Future[None] | None) -> None:
        if fut is None or not fut.done():
            self._error = ReadTimeout("upstream sent nothing within the read timeout")
            if fut is not None:
                fut.set_result(None)
            if self._conn is not None:
                self._conn.abort()
            if fut is None:
                self._wake()

    def _wake(self) -> None:
        cb = self.on_event
        if cb is not None:
            cb()
            return
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- protocol side ---------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        # (a callback takes each read's bytes as they come and pauses for its client itself)
        if self._buffered > READ_HIGH_WATER and not self._paused and not self._collect and self.on_event is None:
            conn = self._conn
            if conn is not None and conn.transport is not None:
                self._paused = True
                conn.transport.pause_reading()
        if self.on_event is None:  # a callback hears of body bytes once per read (_Conn.data_received)
            self._wake()

    def pause(self) -> None:
        """Stop reading the upstream (its client is slow) until `resume`."""
        conn = self._conn
        if not self._paused and conn is not None and conn.transport is not None and not conn.closed:
            self._paused = True
            conn.transport.pause_reading()


    def _fail(self, err: UpstreamError) -> None:
        if self._error is None and not self.complete:
            self._error = err
        self._wake()


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a replica; carries one exchange at a time."""

    __slots__ = (
        "closed", "counted", "idle_since", "loop", "parser", "pool", "resp", "timer", "timer_at", "transport",
        "wait_due",
    )  # fmt: skip

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: UpstreamResponse | None = None
        self.closed = False
        self.counted = False  # in the pool's open-connection count
        self.idle_since = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        # Read timeout: a timer per wait (call_later + cancel) cost more than the rest of the client per
        # call, so each connection keeps one timer that, when it fires, re-arms for the current wait's
        # deadline or stands down when nothing waits.
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.wait_due = 0.0  # when the wait in progress times out (loop time)

    def watch(self, read_timeout: float) -> None:
        """A wait for this connection's answer starts now: it fails if nothing arrives within `read_timeout`."""
        loop = self.loop
        assert loop is not None
        due = self.wait_due = loop.time() + read_timeout
        timer = self.timer
        if timer is None or self.timer_at > due:  # none armed, or armed for later than this wait allows
            if timer is not None:
                timer.cancel()
            self.timer_at = due
            self.timer = loop.call_at(due, self._check_timeout)

    def _check_timeout(self) -> None:
        self.timer = None
        resp = self.resp
        if resp is None or self.closed or self.loop is None:
            return
        w = resp._waiter
        # a callback waits for as long as the answer is unfinished, unless it paused reading for a slow client
        if (w is None or w.done()) and (resp.on_event is None or resp.complete or resp._error is not None or resp._paused):
            return  # nothing waits now: the next wait re-arms
        if w is not None and w.done():
            w = None
        if self.loop.time() < self.wait_due:  # a later wait began since: its own deadline
            self.timer_at = self.wait_due
            self.timer = self.loop.call_at(self.wait_due, self._check_timeout)
            return
        resp._on_timeout(w)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def send(self, data: bytes | Iterable[bytes], read_timeout: float) -> UpstreamResponse:
        assert self.transport is not None
        resp = self.resp = UpstreamResponse(self, read_timeout)
        if isinstance(data, bytes):
            self.transport.write(data)
        else:
            self.transport.writelines(data)
        return resp

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            if self.transport is not None:
                self.transport.abort()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.loop = asyncio.get_running_loop()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes with no request outstanding: the connection is not reusable
            self.abort()
            return
        resp.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            resp._fail(Disconnected(f"invalid HTTP from upstream: {e}"))
            self.abort()
            return
        cb = resp.on_event
        if cb is not None and resp._chunks:  # body bytes of this read, in one event (one write to the client)
            cb()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self.counted:
            self.counted = False
            self.pool._on_closed()
        resp = self.resp
        if resp is not None and not resp.complete:
            if resp.headers_done and resp.header(b"content-length") is None and resp.header(b"transfer-encoding") is None:
                resp.complete = True  # a body delimited by closing the connection (HTTP/1.0 style) ends here
                resp._conn = None
                self.resp = None
                resp._wake()
            else:
                resp._fail(Disconnected("upstream closed the connection"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.resp is not None:
            self.resp.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self.resp
        if resp is not None:
            resp.status = self.parser.get_status_code()
            if 100 <= resp.status < 200:  # interim answer: the real one follows
                resp.raw_headers.clear()
                return
            resp.headers_done = True
            resp._wake()

    def on_body(self, body: bytes) -> None:
        if self.resp is not None:
            self.resp._feed(body)

    def on_message_complete(self) -> None:
        resp = self.resp
        if resp is None or not resp.headers_done:
            return
        resp.complete = True
        resp._conn = None
        self.resp = None
        if resp._paused:  # the whole answer is buffered; the connection must read again for its next call
            resp._paused = False
            if self.transport is not None:
                self.transport.resume_reading()
        if self.parser.should_keep_alive() and not self.closed:
            self.pool.release(self)
        else:
            self.abort()
        resp._wake()


class ReplicaPool:
    """Keep-alive connections to one replica (most recently used first)."""

    def __init__(
        self,
        base_url: str,
        connect_timeout_s: float,
        keepalive_s: float,
        max_connections: int = 0,
        max_idle: int = 1024,
    ) -> None:
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"replica URL must be http(s)://host[:port]: {base_url}")
        self.host = u.hostname
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if u.scheme == "https" else None
        self.port = u.port or (443 if self.ssl else 80)
        self.host_header = f"{u.hostname}:{self.port}".encode()
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_idle = max_idle
        self.max_connections = max_connections  # 0 = unlimited
        self._open = 0  # connections made and not yet lost
        self._idle: list[_Conn] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def request(self, head: bytes, body: bytes, read_timeout_s: float) -> UpstreamResponse:
        """Send one request (head ends with the blank line) and wait for the answer's status and headers.

        A kept-alive connection that turns out closed before any answer byte is replaced once by a fresh one.
        """
        data: bytes | list[bytes] = head + body if len(body) < 65536 else [head, body]
        conn = self.take_idle()
        if conn is not None:
            resp = conn.send(data, read_timeout_s)
            try:
                await resp.wait_headers()
                return resp
            except Disconnected:
                if resp.got_bytes:
                    raise
            except BaseException:
                resp.close()
                raise
        conn = await self._acquire(read_timeout_s)
        resp = conn.send(data, read_timeout_s)
        try:
            await resp.wait_headers()
        except BaseException:
            resp.close()
            raise
        return resp

    def release(self, conn: _Conn) -> None:
        if len(self._idle) < self.max_idle:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
            self._wake_one()
        else:
            conn.abort()

    def _on_closed(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return

    async def _acquire(self, wait_s: float) -> _Conn:
        """An idle connection, else a new one; at `max_connections` open, wait (up to wait_s) for one."""
        deadline = time.monotonic() + wait_s
        while True:
            conn = self.take_idle()
            if conn is not None:
                return conn
            if not self.max_connections or self._open < self.max_connections:
                self._open += 1
                try:
                    conn = await self._connect()
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
                if conn.closed:  # lost already: its connection_lost did not count it
                    self._open -= 1
                    self._wake_one()
                else:
                    conn.counted = True
                return conn
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await fut
            except TimeoutError:
                raise ConnectTimeout(f"all {self.max_connections} connections to {self.host}:{self.port} busy") from None

    def close(self) -> None:
        for c in self._idle:
            c.abort()
        self._idle.clear()

    def take_idle(self) -> _Conn | None:
        """A kept-alive connection that is still open and fresh, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if time.monotonic() - conn.idle_since > self.keepalive_s:
                # the rest are older still: drop them all
                conn.abort()
                for c in idle:
                    c.abort()
                idle.clear()
                return None
            return conn
        return None

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(lambda: _Conn(self), self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            raise ConnectTimeout(f"connect to {self.host}:{self.port} timed out") from None
        except ConnectionRefusedError:
            raise ConnectFailed(f"connection to {self.host}:{self.port} refused", conclusive=True) from None
        except OSError as e:
            raise ConnectFailed(f"cannot connect to {self.host}:{self.port}: {e.strerror or e}") from None
        return conn


def request_head(method: bytes, path: bytes, host: bytes, body_len: int, extra: bytes) -> bytes:
    """The request line and headers of one upstream call (`extra` = forwarded header lines)."""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n" % (method, path, host, body_len, extra)
