"""A lean HTTP/1.1 server path for the two hot endpoints; aiohttp keeps every other route.

aiohttp's server builds a request object, a payload stream, a router match, a response
object and a writer per call; for a proxy whose work per call is tens of microseconds that
is a large share. Here one asyncio protocol per connection frames requests itself (head via
llhttp/httptools, body by Content-Length or chunked decoding), runs the same route handler
(and middlewares) that aiohttp would for `POST /v1/chat/completions` and `POST /v1/completions`,
and writes each answer in one send. A connection whose next request is anything else is handed,
bytes and all, to aiohttp's own protocol for the rest of its life, so every other endpoint keeps
aiohttp's full behaviour.

The handler sees a `FastRequest`: `method`, `path`, `raw_path`, `version`, `headers`
(case-insensitive), `raw_headers`, `content_length`, `await read()` / `json()` / `text()`,
`remote`, `app`, `query`, `match_info`, `keep_alive`, and per-request storage (`request[key]`).
A streamed answer is opened with `request.stream_response(status, headers)`; it has aiohttp's
`prepare` / `write` / `write_eof` and raises ConnectionResetError once the client is gone.
A client that disconnects cancels its handler task (as aiohttp's handler_cancellation does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

import httptools
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from gateway.errors import error_body

log = logging.getLogger("pythia.fastpath")

HOT_PATHS = (b"/v1/chat/completions", b"/v1/completions")
MAX_HEAD_BYTES = 65536  # request line + headers; more is 431
LINGER_S = 2.0  # after a 413: how long to drop the rest of the refused body before closing
READ_PAUSE_BYTES = 1 << 20  # unprocessed (pipelined) bytes at which we stop reading the socket
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_SKIP_RESPONSE_HEADERS = frozenset(("content-length", "transfer-encoding", "connection", "date", "server"))
_NO_HEADERS: Mapping[str, str] = {}

Handler = Callable[[Any], Awaitable[web.StreamResponse]]
# (request, finish) -> the answer now, a coroutine to run in a task, or an exchange in flight (gateway.exchange)
Starter = Callable[[Any, Callable[[Any, Any], None]], Any]


class _Date:
    """The Date header line, rebuilt once a second."""

    second = 0
    line = b""

    @classmethod
    def get(cls) -> bytes:
        now = int(time.time())
        if now != cls.second:
            cls.second = now
            cls.line = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return cls.line


def _header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(
        b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in headers
        if k.lower() not in _SKIP_RESPONSE_HEADERS
    )


class FastRequest:
    """The request a hot-path handler receives (the slice of aiohttp's web.Request the gateway uses)."""

    __slots__ = (
        "_body", "_headers", "_proto", "_store", "_tagged", "_too_large", "app", "content_length", "keep_alive", "method",
        "raw_headers", "raw_path", "version",
    )  # fmt: skip

    def __init__(
        self,
        proto: FastProtocol,
        method: str,
        raw_path: str,
        version: tuple[int, int],
        raw_headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        keep_alive: bool,
    ) -> None:
        self._proto = proto
        self.app = proto.server.app
        self.method = method
        self.raw_path = raw_path
        self.version = version
        self.raw_headers = raw_headers
        self.content_length = content_length
        self.keep_alive = keep_alive
        self._headers: CIMultiDictProxy[str] | None = None
        self._body = b""
        self._too_large = 0  # body bytes received when over the limit
        self._store: dict[Any, Any] | None = None
        self._tagged = True  # may carry X-Pythia-* headers (the framing sets False when it saw none)

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        h = self._headers
        if h is None:
            h = self._headers = CIMultiDictProxy(
                CIMultiDict([(k.decode("latin-1"), v.decode("latin-1")) for k, v in self.raw_headers])
            )
        return h

    @property
    def path(self) -> str:
        return self.raw_path.split("?", 1)[0]

    @property
    def query(self) -> MultiDictProxy[str]:
        from urllib.parse import parse_qsl

        _, _, qs = self.raw_path.partition("?")
        return MultiDictProxy(MultiDict(parse_qsl(qs, keep_blank_values=True)))

    @property
    def match_info(self) -> dict[str, str]:
        return {}

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "application/octet-stream").split(";", 1)[0].strip().lower()

    @property
    def remote(self) -> str | None:
        peer = self._proto.peer
        return str(peer[0]) if isinstance(peer, tuple) else None

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._proto.transport

    async def read(self) -> bytes:
        """The whole body (already received when the handler runs); 413 past the body limit, as aiohttp does."""
        if self._too_large:
            raise web.HTTPRequestEntityTooLarge(max_size=self._proto.server.body_limit, actual_size=self._too_large)
        return self._body

    async def text(self) -> str:
        return (await self.read()).decode()

    async def json(self) -> Any:
        return orjson.loads(await self.read())

    def stream_response(self, status: int, headers: CIMultiDict[str]) -> FastStreamResponse:
        """A streamed (chunked) answer on this connection; its status and headers leave with its first bytes."""
        return FastStreamResponse(self._proto, status, headers, self.version >= (1, 1))

    def raw_stream_response(self, status: int, header_lines: bytes) -> FastStreamResponse:
        """`stream_response` with the headers as ready `Name: value\\r\\n` lines (no header map built)."""
        return FastStreamResponse(self._proto, status, None, self.version >= (1, 1), header_lines)

    def raw_response(self, status: int, header_lines: bytes, body: bytes) -> FastRawResponse:
        """A whole answer with its headers as ready `Name: value\\r\\n` lines, written in one send."""
        return FastRawResponse(status, header_lines, body)

    def tag_headers(self) -> Mapping[str, str]:
        """Only the X-Pythia-* headers (case-insensitive), without building the whole header map."""
        if not self._tagged:  # seen while framing the head: no X-Pythia-* header at all
            return _NO_HEADERS
        found = [(k, v) for k, v in self.raw_headers if k[:9].lower() == b"x-pythia-"]
        return CIMultiDict([(k.decode("latin-1"), v.decode("latin-1")) for k, v in found])

    def __getitem__(self, key: Any) -> Any:
        if self._store is None:
            raise KeyError(key)
        return self._store[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._store is None:
            self._store = {}
        self._store[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return default if self._store is None else self._store.get(key, default)


class FastRawResponse(web.StreamResponse):
    """A whole answer for the fast path: status, raw header lines and body, written as one send.

    Subclasses aiohttp's StreamResponse only so that handlers and middlewares may return it where
    one is expected; its __init__ is skipped on purpose (no header map, cookies or state per call).
    """

    def __init__(self, status: int, header_lines: bytes, body: bytes) -> None:
        self._status = status
        self.header_lines = header_lines
        self.raw_body = body


class FastStreamResponse(web.StreamResponse):
    """A streamed answer written straight to the connection (chunked on HTTP/1.1, else ended by closing).

    Subclasses aiohttp's StreamResponse only so that handlers may return it where one is expected;
    none of aiohttp's writing machinery is used.
    """

    def __init__(
        self,
        proto: FastProtocol,
        status: int,
        headers: CIMultiDict[str] | None,
        chunked: bool,
        header_lines: bytes | None = None,
    ) -> None:
        super().__init__(status=status, headers=headers)
        self._lines = header_lines
        self._proto_ = proto
        self._chunked_ = chunked
        self._head: bytes | None = None
        self._done = False

    async def prepare(self, request: Any) -> None:
        """Headers are held and sent with the first body bytes (one send, not two)."""
        self.open()

    def open(self) -> None:
        """`prepare` without awaiting (gateway.exchange relays from callbacks)."""
        if self._head is None:
            proto = self._proto_
            if not self._chunked_:
                proto.keep_alive = False
            self._head = (
                b"HTTP/1.1 %d %s\r\n" % (self.status, _REASONS.get(self.status, b"Unknown"))
                + (self._lines if self._lines is not None else _header_lines(self.headers.items()))
                + _Date.get()
                + (b"Transfer-Encoding: chunked\r\n" if self._chunked_ else b"")
                + (b"" if proto.keep_alive and not proto.server.closing else b"Connection: close\r\n")
                + b"\r\n"
            )

    @property
    def prepared(self) -> bool:
        return self._head is not None

    def _frame(self, data: bytes) -> bytes:
        if not self._chunked_ or not data:
            return data
        return b"%x\r\n%s\r\n" % (len(data), data)

    def _send(self, data: bytes) -> None:
        proto = self._proto_
        t = proto.transport
        if t is None or proto.lost or t.is_closing():
            raise ConnectionResetError("client went away")
        head = self._head
        if head:
            self._head = b""
            data = head + data
        if data:
            t.write(data)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        self.send(bytes(data))
        if self._proto_.write_paused:
            await self._proto_.drain()

    async def write_eof(self, data: bytes = b"") -> None:
        self.send_eof(data)

    def send(self, data: bytes) -> None:
        """Write body bytes now (no waiting for the client to drain); ConnectionResetError once it is gone."""
        if self._head is None:
            self.open()
        self._send(self._frame(data))

    def send_eof(self, data: bytes = b"") -> None:
        """Write the last body bytes and the stream's end."""
        if self._done:
            return
        if self._head is None:
            self.open()
        self._done = True
        self._send(self._frame(data) + (b"0\r\n\r\n" if self._chunked_ else b""))
        self._proto_.stream_finished = True

    @property
    def client_paused(self) -> bool:
        """The client reads slower than we write: stop reading the upstream until `on_writable` runs."""
        return self._proto_.write_paused

    def on_writable(self, callback: Callable[[], None] | None) -> None:
        """Run `callback` once the client has drained (None: forget it)."""
        self._proto_.on_writable = callback


class FastServer:
    """Shared state of one worker's fast path: the handlers, the aiohttp fallback and the open connections."""

    def __init__(self, app: web.Application, fallback: Callable[[], asyncio.Protocol], body_limit: int) -> None:
        self.app = app
        self.fallback = fallback  # aiohttp's web.Server: makes the protocol a handed-off connection continues with
        self.body_limit = body_limit
        self.handlers: dict[bytes, Handler] = {}
        # task-free starts of the same handlers (`Gateway.begin_completion`), when nothing wraps them
        self.starts: dict[bytes, Starter] = {}
        self.conns: set[FastProtocol] = set()
        self.closing = False
        self._idle_waiter: asyncio.Future[None] | None = None

    def resolve_handlers(self) -> None:
        """The handler aiohttp would run for each hot path, wrapped in the app's middlewares (after startup)."""
        for path in HOT_PATHS:
            handler = _route_handler(self.app, path.decode())
            if handler is None:
                continue
            owner = getattr(handler, "__self__", None)
            fast_start = getattr(owner, "fast_start", None)
            start = fast_start(handler) if fast_start is not None and not self.app.middlewares else None
            if start is not None:
                self.starts[path] = start
            for mw in reversed(tuple(self.app.middlewares)):
                handler = functools.update_wrapper(functools.partial(mw, handler=handler), handler)
            self.handlers[path] = handler

    def __call__(self) -> FastProtocol:
        return FastProtocol(self)

    def _busy(self) -> int:
        return sum(1 for c in self.conns if c.task is not None)

    def conn_idle(self) -> None:
        w = self._idle_waiter
        if w is not None and not w.done() and not self._busy():
            w.set_result(None)

    async def shutdown(self, grace_s: float) -> None:
        """Close idle connections now, let in-flight calls finish within `grace_s`, then cancel the rest."""
        self.closing = True
        for c in list(self.conns):
            if c.task is None:
                c.close()
        if self._busy():
            self._idle_waiter = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._idle_waiter
        for c in list(self.conns):
            if c.task is not None:
                c.task.cancel()
            c.close()


def _route_handler(app: web.Application, path: str) -> Handler | None:
    for resource in app.router.resources():
        info = resource.get_info()
        if info.get("path") != path:
            continue
        for route in resource:
            if route.method == "POST":
                return cast(Handler, route.handler)
    return None


class FastProtocol(asyncio.Protocol):
    """One client connection: frames requests, runs the hot handler, writes answers; hands others to aiohttp."""

    __slots__ = (
        "_buf", "_chunked", "_current", "_discard", "_drain", "_hdrs", "_loop", "_method_ok", "_need", "_parser",
        "_parts", "_pending", "_read_paused", "_url", "keep_alive", "lost", "on_writable", "peer", "server",
        "stream_finished", "task", "transport", "write_paused",
    )  # fmt: skip

    def __init__(self, server: FastServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self._buf = b""
        self._pending: FastRequest | None = None  # head parsed, body still arriving
        self._need = 0  # Content-Length body bytes still missing
        self._chunked = False
        self._hdrs: list[tuple[bytes, bytes]] = []
        self._url = b""
        self._parts: list[bytes] = []
        self._method_ok = False
        self._parser: httptools.HttpRequestParser | None = None
        self._read_paused = False
        self._drain: asyncio.Future[None] | None = None
        # the request being handled: its task, or the exchange that follows it without one (gateway.exchange)
        self.task: asyncio.Task[None] | Any | None = None
        self._current: FastRequest | None = None
        self.keep_alive = True
        self.lost = False
        self.write_paused = False
        self.on_writable: Callable[[], None] | None = None  # a callback relay waiting for the client to drain
        self.stream_finished = False
        self._discard = False  # after refusing an oversized body: drop the rest of it

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # kept: asyncio.get_running_loop() makes a getpid() system call each time (CPython 3.11)
        self._loop = asyncio.get_running_loop()
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.conns.add(self)
        if self.server.closing:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.server.conns.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the client went away: the proxy closes its upstream call
        d = self._drain
        if d is not None and not d.done():
            d.set_exception(ConnectionResetError("client went away"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)
        cb = self.on_writable
        if cb is not None:
            self.on_writable = None
            cb()

    async def drain(self) -> None:
        if self.lost:
            raise ConnectionResetError("client went away")
        if self.write_paused:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def data_received(self, data: bytes) -> None:
        if self._discard:
            return
        self._buf = self._buf + data if self._buf else data
        if self.task is None:
            self._process()
        elif len(self._buf) > READ_PAUSE_BYTES and not self._read_paused and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        # the client closed its side: as aiohttp does, treat it as gone (a running call is cancelled)
        return None

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- framing ---------------------------------------------------------------------------------
    def _process(self) -> None:
        """Frame and dispatch requests from the buffer while no request is being handled."""
        while self.task is None and not self.lost:
            if self._pending is None:
                if not self._start_request():
                    return
                continue
            if not self._collect_body():
                return
            req = self._pending
            self._pending = None
            self._dispatch(req)

    def _start_request(self) -> bool:
        """Parse the next request head; False when more bytes are needed or the connection left this path."""
        buf = self._buf
        if not buf:
            return False
        if not buf.startswith(b"POST /"):
            if len(buf) < 6 and b"POST /".startswith(buf):
                return False
            self._hand_off()
            return False
        line_end = buf.find(b"\r\n")
        if line_end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                self._hand_off()
            return False
        target = buf[5:line_end].rsplit(b" ", 1)[0]
        if target.split(b"?", 1)[0] not in self.server.handlers:
            self._hand_off()
            return False
        end = buf.find(b"\r\n\r\n", line_end - 2)
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                self._fail(431, "request_header_too_large", "request headers are too large")
            return False
        head_len = end + 4
        self._hdrs = []
        self._url = b""
        self._chunked = False
        self._method_ok = False
        parser = self._parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(buf[:head_len])
        except httptools.HttpParserError as e:
            self._fail(400, "invalid_request", f"malformed HTTP request: {e}")
            return False
        if not self._method_ok:
            self._fail(400, "invalid_request", "malformed HTTP request")
            return False
        self._buf = buf[head_len:]
        # the parser accepted the request line, so it ends in its HTTP version (get_http_version formats a str)
        version = (1, 1) if buf[line_end - 3 : line_end] == b"1.1" else (1, 0)
        keep_alive = parser.should_keep_alive()
        self._parser = None
        cl: int | None = None
        expect = False
        tagged = False
        for k, v in self._hdrs:
            lk = k.lower()
            if lk == b"content-length":
                cl = int(v)
            elif lk == b"expect" and v.lower() == b"100-continue":
                expect = True
            elif lk[:9] == b"x-pythia-":
                tagged = True
        if self._chunked:
            cl = None
        req = FastRequest(self, "POST", self._url.decode("latin-1"), version, self._hdrs, cl, keep_alive)
        req._tagged = tagged
        self._pending = req
        self._need = cl or 0
        if cl is not None and cl > self.server.body_limit:
            req._too_large = cl
        if expect and self.transport is not None and not self._buf:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _collect_body(self) -> bool:
        """Move body bytes from the buffer into the pending request; True when it is complete."""
        req = self._pending
        assert req is not None
        if self._chunked:
            return self._collect_chunked(req)
        if req._too_large:  # declared larger than the limit: answer 413 now and close, unread
            self.keep_alive = req.keep_alive = False
            self._buf = b""
            self._need = 0
            return True
        need = self._need
        if need:
            buf = self._buf
            if len(buf) >= need and not self._parts:  # the usual case: the whole body is here
                req._body, self._buf = (buf, b"") if len(buf) == need else (buf[:need], buf[need:])
                self._need = 0
                return True
            if buf:  # a large body arriving in pieces: collect them, join once
                take = buf if len(buf) <= need else buf[:need]
                self._buf = buf[len(take) :]
                self._parts.append(take)
                self._need = need = need - len(take)
            if need:
                return False
            req._body = b"".join(self._parts)
            self._parts.clear()
        return True

    def _collect_chunked(self, req: FastRequest) -> bool:
        """Decode whole chunks from the buffer; True after the last chunk and its trailers."""
        buf = self._buf
        pos = 0
        parts = [req._body] if req._body else []
        size_total = len(req._body) + req._too_large
        done = False
        while True:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            try:
                size = int(buf[pos:nl].split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._fail(400, "invalid_request", "malformed chunked body")
                return False
            if size == 0:
                end = buf.find(b"\r\n\r\n", nl) if buf[nl + 2 : nl + 4] != b"\r\n" else nl
                if buf[nl + 2 : nl + 4] == b"\r\n":
                    pos = nl + 4
                elif end >= 0:
                    pos = end + 4
                else:
                    break
                done = True
                break
            if len(buf) < nl + 2 + size + 2:
                break
            parts.append(buf[nl + 2 : nl + 2 + size])
            size_total += size
            pos = nl + 2 + size + 2
        self._buf = buf[pos:]
        if size_total > self.server.body_limit:
            req._too_large = size_total
            req._body = b""
        else:
            req._body = b"".join(parts)
        return done

    # httptools callbacks (head only)
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._hdrs.append((name, value))
        if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
            self._chunked = True

    def on_headers_complete(self) -> None:
        self._method_ok = self._parser is not None and self._parser.get_method() == b"POST"

    # -- handling --------------------------------------------------------------------------------
    def _dispatch(self, req: FastRequest) -> None:
        self.keep_alive = req.keep_alive and not self.server.closing
        self.stream_finished = False
        path = req.path.encode("latin-1")
        start = self.server.starts.get(path)
        if start is None:
            self.task = self._loop.create_task(self._handle(self.server.handlers[path](req), req))
            return
        self._current = req
        try:
            out = start(req, self._finish)
        except Exception:
            log.exception("hot-path handler failed")
            self._respond(self._internal_error(), req)
            return
        if isinstance(out, web.StreamResponse):
            self._respond(out, req)
        elif asyncio.iscoroutine(out):
            self.task = self._loop.create_task(self._handle(out, req))
        else:  # an exchange in flight: it calls _finish
            self.task = out

    def _finish(self, resp: web.StreamResponse | None, rest: Awaitable[web.StreamResponse] | None) -> None:
        """An exchange ended: write its answer, or run the rest of the call in a task."""
        req = self._current
        assert req is not None
        if rest is not None:
            self.task = self._loop.create_task(self._handle(rest, req))
            return
        self.task = None
        if resp is not None:
            self._respond(resp, req)

    def _internal_error(self) -> web.Response:
        self.keep_alive = False
        return web.Response(
            status=500, body=error_body(500, "internal_error", "internal error"), content_type="application/json"
        )

    async def _handle(self, answer: Awaitable[web.StreamResponse], req: FastRequest) -> None:
        try:
            try:
                resp = await answer
            except web.HTTPException as e:
                resp = e
            except asyncio.CancelledError:
                self.close()
                return
            except Exception:
                log.exception("hot-path handler failed")
                resp = self._internal_error()
        finally:
            self.task = None
        self._respond(resp, req)

    def _respond(self, resp: web.StreamResponse, req: FastRequest) -> None:
        """Write a handler's answer (a stream wrote itself), then read on or close."""
        if type(resp) is FastRawResponse:
            self._write_raw(resp)
        elif isinstance(resp, FastStreamResponse):
            if not self.stream_finished:
                self.keep_alive = False  # a stream that did not end cleanly: only closing tells the client
        else:
            self._write_response(resp)
        if self.lost:
            return
        if not self.keep_alive or self.server.closing:
            if req._too_large and not self.lost and self.transport is not None and self.transport.can_write_eof():
                # the client may still be sending the body we refused: end our side, drop what comes, close soon,
                # so that it reads the 413 instead of a reset
                self._discard = True
                self.transport.write_eof()
                asyncio.get_running_loop().call_later(LINGER_S, self.close)
            else:
                self.close()
            self.server.conn_idle()
            return
        self.server.conn_idle()
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        if self._buf:
            self._process()

    def _write_raw(self, resp: FastRawResponse) -> None:
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        body = resp.raw_body
        status = resp._status
        t.write(
            b"HTTP/1.1 %d %s\r\n%sContent-Length: %d\r\n%s%s\r\n%s"
            % (
                status, _REASONS.get(status, b"Unknown"), resp.header_lines, len(body), _Date.get(),
                b"" if self.keep_alive and not self.server.closing else b"Connection: close\r\n", body,
            )
        )  # fmt: skip

    def _write_response(self, resp: web.StreamResponse) -> None:
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return
        body = getattr(resp, "body", None)
        if body is None:
            body = b""
        elif not isinstance(body, bytes):
            body = bytes(getattr(body, "_value", b""))
        status = resp.status
        keep = self.keep_alive and not self.server.closing
        t.write(
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, resp.reason.encode("latin-1")))
            + _header_lines(resp.headers.items())
            + b"Content-Length: %d\r\n" % len(body)
            + _Date.get()
            + (b"" if keep else b"Connection: close\r\n")
            + b"\r\n"
            + body
        )

    def _fail(self, status: int, code: str, message: str) -> None:
        """Answer a request we cannot frame with an OpenAI-shaped error and close the connection."""
        self._buf = b""
        self._pending = None
        t = self.transport
        if t is not None and not t.is_closing():
            body = error_body(status, code, message)
            t.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, _REASONS.get(status, b"Error"), len(body), body)
            )
            t.close()

    def _hand_off(self) -> None:
        """Give this connection (and the bytes received so far) to aiohttp's protocol for the rest of its life."""
        t = self.transport
        if t is None or self.lost:
            return
        self.server.conns.discard(self)
        proto = self.server.fallback()
        buf, self._buf = self._buf, b""
        t.set_protocol(proto)
        proto.connection_made(t)
        if self._read_paused:
            self._read_paused = False
            t.resume_reading()
        if buf:
            proto.data_received(buf)
        self.transport = None


async def start_fast_server(
    app: web.Application,
    runner_server: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    body_limit: int,
    backlog: int = 4096,
) -> tuple[FastServer, asyncio.base_events.Server]:
    """Listen on host:port (SO_REUSEPORT, shared by workers) with the fast path in front of aiohttp."""
    fast = FastServer(app, runner_server, body_limit)
    fast.resolve_handlers()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(fast, host, port, reuse_port=True, backlog=backlog)
    return fast, server
