"""A proxied call in flight without a task: sent from the framing code, answered from the upstream's callbacks.

On the fast server path most calls need nothing awaited: the body is in, routing is synchronous and
a kept-alive connection to the chosen replica is idle. For those, a task, a future and a chain of
coroutines per call cost more than the forwarding itself (`gateway.bench.hotpath_cpu --handler`).
An `UpstreamExchange` sends the request at once and follows the answer through
`UpstreamResponse.on_event`: a whole non-streamed answer goes to the client connection's `finish`;
a stream is relayed as it arrives (one client write per upstream read, the upstream paused while the
client is slow), as `Gateway._relay` relays it. A 5xx to retry elsewhere or a failure before the answer
is handed back to `Gateway._proxy` in a task, with the replica's in-flight counts still held, so the
task path's rules for retries and error answers stay the only ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.errors import sse_error_after, upstream_failure_response
from gateway.features import KEEP_STREAM_BYTES, find_usage, stream_fingerprint, wants_linking
from gateway.upstream import Disconnected, ReadTimeout, ReplicaPool, UpstreamResponse, _Conn, request_head

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.fastpath import FastStreamResponse
    from gateway.proxy import Gateway, Held
    from pools.routing import Decision, RoutingContext
    from pools.types import ReplicaState

Finish = Callable[["web.StreamResponse | None", "Coroutine[Any, Any, web.StreamResponse] | None"], None]


class UpstreamExchange:
    """One call sent to a replica, followed by callbacks until answered, handed over, or cancelled."""

    __slots__ = (
        "checked", "ctx", "decision", "events", "finish", "finished", "gw", "head", "head_len", "hold", "last", "out",
        "payload", "prev", "replica", "request", "resp", "timeout", "ttft",
    )  # fmt: skip

    def __init__(
        self,
        gw: Gateway,
        request: Any,
        ctx: RoutingContext,
        decision: Decision,
        payload: bytes,
        replica: ReplicaState,
        finish: Finish,
    ) -> None:
        self.gw = gw
        self.request = request
        self.ctx = ctx
        self.decision = decision
        self.payload = payload
        self.replica = replica
        self.finish = finish
        self.finished = False
        self.checked = False  # the answer's status and type were looked at
        self.timeout = gw.settings.read_timeout_s
        self.hold: Held = gw.hold(replica, ctx.features, ctx.prediction, decision)
        self.resp: UpstreamResponse | None = None
        # a stream being relayed (as Gateway._relay does it in a task): the client's response, SSE events seen,
        # the last two pieces (for `usage`), the first bytes kept for the output fingerprint, time to first byte
        self.out: FastStreamResponse | None = None
        self.events = 0
        self.prev = self.last = b""
        self.head: list[bytes] | None = None
        self.head_len = 0
        self.ttft = -1.0

    @classmethod
    def start(
        cls,
        gw: Gateway,
        request: Any,
        ctx: RoutingContext,
        decision: Decision,
        payload: bytes,
        replica: ReplicaState,
        pool: ReplicaPool,
        conn: _Conn,
        finish: Finish,
    ) -> UpstreamExchange:
        """Count the call on `replica` and send it on `conn` (an idle kept-alive connection of `pool`)."""
        ex = cls(gw, request, ctx, decision, payload, replica, finish)
        head = request_head(
            b"POST", request.raw_path.encode(), pool.host_header, len(payload), gw._forward_header_lines(request)
        )
        resp = ex.resp = conn.send(head + payload if len(payload) < 65536 else [head, payload], ex.timeout)
        resp.on_event = ex.on_event
        conn.watch(ex.timeout)
        return ex

    # the client connection duck-types this as its in-flight task
    def done(self) -> bool:
        return self.finished

    def cancel(self) -> None:
        """The client went away: abort the upstream answer (the engine stops generating) and count a 499."""
        if self.finished:
            return
        self.finished = True
        resp = self.resp
        if resp is not None:
            resp.on_event = None
            resp.close()
        gw, replica = self.gw, self.replica
        if self.out is not None:  # what the stream's first part taught, as the task path observes it
            gw._observe(self.ctx, self.decision, replica, False, None, max(0, self.events - 2), self.ttft)
        gw.release(replica, self.ctx.features, self.hold)
        gw.metrics.request_done(self.decision.pool, replica.url, 499)

    def on_event(self) -> None:
        """The upstream answer moved on (headers, body bytes, its end, or a failure)."""
        resp = self.resp
        if self.finished or resp is None:
            return
        if self.out is not None:
            self._relay(resp)
            return
        err = resp._error
        if err is not None:
            resp.on_event = None
            resp.close()
            # a kept-alive connection that closed before answering is not the replica's fault: send again
            retry_here = isinstance(err, Disconnected) and not resp.got_bytes
            self._hand_over(None if retry_here else self.gw.failed_attempt(self.replica, err))
            return
        if not resp.headers_done:
            return
        if not self.checked:
            self.checked = True
            self.gw.answer_status(self.replica, resp.status)
            if resp.status >= 500:
                resp.on_event = None
                self._hand_over(resp)  # a failure to retry elsewhere: the task path's work
                return
            if (resp.header(b"content-type") or b"").startswith(b"text/event-stream"):
                self._open_stream(resp)
                return
            resp.collect()
        if not resp.complete:
            self._watch(resp)
            return
        self._answer(resp)

    def _answer(self, resp: UpstreamResponse) -> None:
        """A whole non-streamed answer: to the client, then learn from it (as `Gateway._relay` does)."""
        self.finished = True
        resp.on_event = None
        gw, ctx, decision, replica = self.gw, self.ctx, self.decision, self.replica
        features = ctx.features
        data = resp.take_all()
        status = resp.status
        ttft = time.monotonic() - features.arrival_s
        (gw._loop or asyncio.get_running_loop()).call_soon(gw._observe_answer, ctx, decision, replica, status, data, ttft)
        answer = self.request.raw_response(status, gw._response_header_lines(resp, decision, replica), data)
        resp.close()
        gw.release(replica, features, self.hold)
        gw.metrics.request_finished(decision.pool, replica.url, status, ttft, time.monotonic() - features.arrival_s)
        self.finish(answer, None)

    def _open_stream(self, resp: UpstreamResponse) -> None:
        gw = self.gw
        self.out = self.request.raw_stream_response(resp.status, gw._response_header_lines(resp, self.decision, self.replica))
        self.out.open()
        # the stream's first bytes, kept (by reference) for the output fingerprint of untagged calls
        self.head = [] if wants_linking(self.ctx.tags) else None
        self._relay(resp)

    def _relay(self, resp: UpstreamResponse) -> None:
        """Pass on the stream's bytes of this read (one write), its end, or how it broke."""
        out = self.out
        assert out is not None
        err = resp._error
        if not resp._chunks and not resp.complete and err is None:
            self._watch(resp)
            return
        if self.ttft < 0:
            if err is not None and not resp._chunks:  # nothing reached the client yet: a plain error answer
                self._fail_first(resp, err)
                return
            self.ttft = time.monotonic() - self.ctx.features.arrival_s
        chunk = resp.take_all()
        if chunk:
            self.events += chunk.count(b"data:")
            self.prev, self.last = self.last, chunk
            head = self.head
            if head is not None and self.head_len < KEEP_STREAM_BYTES:
                head.append(chunk)
                self.head_len += len(chunk)
        try:
            if resp.complete:
                out.send_eof(chunk)
                self._end_stream(resp, True, resp.status)
                return
            if err is not None:
                # upstream broke mid-stream: end the SSE stream cleanly with an error event
                self.gw._upstream_error(self.replica.url, err.kind)
                tail = chunk or self.last or self.prev
                out.send(chunk + sse_error_after(tail, "upstream_" + err.kind, "the upstream stream ended early"))
                out.send_eof()
                self._end_stream(resp, False, 502)
                return
            if chunk:
                out.send(chunk)
        except ConnectionError:
            self.cancel()  # the client went away mid-stream: the upstream answer is aborted
            return
        if out.client_paused:  # a slow client: stop reading the upstream until it drains (no read timeout meanwhile)
            resp.pause()
            out.on_writable(self._client_drained)
            return
        self._watch(resp)

    def _client_drained(self) -> None:
        resp = self.resp
        if not self.finished and resp is not None:
            resp.resume()
            self._watch(resp)  # waiting on the upstream again: its silence counts from now

    def _watch(self, resp: UpstreamResponse) -> None:
        conn = resp._conn
        if conn is not None:
            conn.watch(self.timeout)  # the read timeout is the longest silence, as for a waiting task

    def _fail_first(self, resp: UpstreamResponse, err: Exception) -> None:
        """The stream failed before its first byte: answer as the task path does (502, or 504 on a timeout)."""
        self.finished = True
        resp.on_event = None
        resp.close()
        self.gw._upstream_error(self.replica.url, getattr(err, "kind", "error"))
        failed = upstream_failure_response(err, isinstance(err, ReadTimeout))
        self.gw.release(self.replica, self.ctx.features, self.hold)
        self.gw.metrics.request_finished(self.decision.pool, self.replica.url, failed.status, -1.0,
                                         time.monotonic() - self.ctx.features.arrival_s)  # fmt: skip
        self.finish(failed, None)

    def _end_stream(self, resp: UpstreamResponse, ok: bool, status: int) -> None:
        self.finished = True
        resp.on_event = None
        resp.close()
        gw, ctx, decision, replica = self.gw, self.ctx, self.decision, self.replica
        features = ctx.features
        head = self.head
        out_fp = stream_fingerprint(b"".join(head), bool(features.messages)) if head and ok else ""
        gw._observe(ctx, decision, replica, ok, find_usage(self.prev + self.last), max(0, self.events - 2), self.ttft, out_fp)
        gw.release(replica, features, self.hold)
        gw.metrics.request_finished(decision.pool, replica.url, status, self.ttft, time.monotonic() - features.arrival_s)
        assert self.out is not None
        self.finish(self.out, None)

    def _hand_over(self, first: Any) -> None:
        """Let `Gateway._proxy` finish the call in a task, from this attempt's outcome (None: send again)."""
        self.finished = True
        coro = self.gw._proxy(self.request, self.ctx, self.decision, self.payload, first, self.hold)
        self.finish(None, coro)
