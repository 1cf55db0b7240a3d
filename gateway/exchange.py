"""A proxied call in flight without a task: sent from the framing code, answered from the upstream's callbacks.

On the fast server path most calls need nothing awaited: the body is in, routing is synchronous and
a kept-alive connection to the chosen replica is idle. For those, a task, a future and a chain of
coroutines per call cost more than the forwarding itself (`gateway.bench.hotpath_cpu --handler`).
An `UpstreamExchange` sends the request at once and follows the answer through
`UpstreamResponse.on_event`; when the whole non-streamed answer is in, it hands it to the client
connection's `finish`. Anything else (a stream to relay, a 5xx to retry, a failure before the answer)
is handed back to `Gateway._proxy` in a task, with the replica's in-flight counts still held, so the
task path's rules (retries, error answers, relaying) stay the only ones.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from gateway.upstream import Disconnected, ReplicaPool, UpstreamResponse, _Conn, request_head

if TYPE_CHECKING:
    from aiohttp import web

    from gateway.proxy import Gateway, Held
    from pools.routing import Decision, RoutingContext
    from pools.types import ReplicaState

Finish = Callable[["web.StreamResponse | None", "Coroutine[Any, Any, web.StreamResponse] | None"], None]


class UpstreamExchange:
    """One call sent to a replica, followed by callbacks until answered, handed over, or cancelled."""

    __slots__ = (
        "checked", "ctx", "decision", "finish", "finished", "gw", "hold", "payload", "replica", "request", "resp",
        "timeout",
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
        gw.release(replica, self.ctx.features, self.hold)
        gw.metrics.request_done(self.decision.pool, replica.url, 499)

    def on_event(self) -> None:
        """The upstream answer moved on (headers, body bytes, its end, or a failure)."""
        resp = self.resp
        if self.finished or resp is None:
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
            ctype = resp.header(b"content-type") or b""
            if resp.status >= 500 or ctype.startswith(b"text/event-stream"):
                resp.on_event = None
                self._hand_over(resp)  # a stream to relay or a failure to retry: the task path's work
                return
            resp.collect()
        if not resp.complete:
            conn = resp._conn
            if conn is not None:
                conn.watch(self.timeout)  # the read timeout is the longest silence, as for a waiting task
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

    def _hand_over(self, first: Any) -> None:
        """Let `Gateway._proxy` finish the call in a task, from this attempt's outcome (None: send again)."""
        self.finished = True
        coro = self.gw._proxy(self.request, self.ctx, self.decision, self.payload, first, self.hold)
        self.finish(None, coro)
