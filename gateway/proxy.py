"""The hot path: one completion request from arrival to its last byte.

parse once (orjson) -> tags -> features -> predict -> route -> forward (original bytes
unless we changed the body) -> stream the upstream's bytes back as they arrive ->
observe. Retries happen only before the first byte reached the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.errors import error_response, sse_error_after, upstream_failure_response
from gateway.exchange import UpstreamExchange
from gateway.features import (
    KEEP_STREAM_BYTES,
    add_predictor_inputs,
    answer_usage_and_fingerprint,
    find_usage,
    stream_fingerprint,
    wants_linking,
)
from gateway.health import ReplicaMonitor
from gateway.metrics import GatewayMetrics, LocalGauge
from gateway.prediction import PredictorLike
from gateway.settings import Settings
from gateway.tags import HEADER_NAMES, TagError, read_tags
from gateway.tasks import cancel_and_wait
from gateway.upstream import (
    ConnectFailed,
    ConnectTimeout,
    ReadTimeout,
    ReplicaPool,
    UpstreamError,
    UpstreamResponse,
    request_head,
)
from pools.request_features import InvalidRequest, extract_features
from pools.routing import Decision, Policy, PrewarmAction, RoutingContext, RoutingState, make_policy, route
from pools.routing.router import NO_REPLICA_RETRY_AFTER_S
from pools.types import ClusterView, PoolConfig, ReplicaState
from predictor.types import Outcome, Prediction, RequestFeatures, Tags

log = logging.getLogger("pythia.proxy")

# request headers never forwarded upstream (hop-by-hop, recomputed, or ours)
_DROP_REQUEST_HEADERS = (
    "Host", "Content-Length", "Connection", "Keep-Alive", "Transfer-Encoding", "TE", "Trailer", "Upgrade",
    "Proxy-Connection", "Proxy-Authorization", "Expect", "Accept-Encoding", *HEADER_NAMES.values(),
)  # fmt: skip
_DROP_REQUEST_RAW = frozenset(h.lower().encode() for h in (*_DROP_REQUEST_HEADERS, "Content-Type"))
# response headers not copied back (hop-by-hop or set by our own server)
_DROP_RESPONSE_HEADERS = frozenset(
    ("content-length", "transfer-encoding", "connection", "keep-alive", "date", "server", "trailer", "upgrade")
)
_DROP_RESPONSE_RAW = frozenset(h.encode() for h in _DROP_RESPONSE_HEADERS)
LOG_EVERY_S = 10.0  # upstream errors are counted always, logged at most this often per replica and kind

# Hook types for the pieces that plug into the hot path (README, "Extending the hot path")
AdmissionHook = Callable[[RoutingContext, Decision], Awaitable[Decision]]
PrewarmHook = Callable[[tuple[PrewarmAction, ...]], None]
ReleaseListener = Callable[[ReplicaState], None]
RateLimitHook = Callable[[web.Request, int], Awaitable[web.Response | None]]


def with_field(raw: bytes, non_empty: bool, key: bytes, value: int | float) -> bytes:
    """`raw` (a JSON object's bytes, `key` absent from it) with `"key": value` added at its end."""
    end = raw.rstrip()
    if not end.endswith(b"}"):  # not what orjson parsed as an object: cannot happen, re-serializing is the fallback
        body = orjson.loads(raw)
        body[key.decode()] = value
        return orjson.dumps(body)
    return b'%s%s"%s":%s}' % (end[:-1], b"," if non_empty else b"", key, orjson.dumps(value))


class _SSEResponse(web.StreamResponse):
    """A streamed answer whose status line and headers leave with its first bytes (one send, not two).

    The first upstream chunk follows the upstream's headers within microseconds, so holding our
    headers until then costs the client nothing and saves a syscall per stream.
    """

    _send_headers_immediately = False


class _Call:
    """One completion call once read: its bytes, parsed body, tags and features."""

    __slots__ = ("body", "changed", "features", "raw", "t0", "tags")

    def __init__(
        self, raw: bytes, body: dict[str, Any], changed: bool, tags: Tags, features: RequestFeatures, t0: float
    ) -> None:
        self.raw = raw
        self.body = body
        self.changed = changed  # tags were removed from the body: forward it re-serialized
        self.tags = tags
        self.features = features
        self.t0 = t0


class Held:
    """What `Gateway.hold` counted on a replica for one call, for `Gateway.release` to undo."""

    __slots__ = ("expected", "gauge", "reserve")

    def __init__(self, reserve: int, expected: int, gauge: LocalGauge) -> None:
        self.reserve = reserve
        self.expected = expected
        self.gauge = gauge


class _Attempt:
    """Why an upstream attempt failed before any byte went to the client."""

    __slots__ = ("code", "kind", "message", "retryable", "status")

    def __init__(self, kind: str, status: int, code: str, message: str, retryable: bool) -> None:
        self.kind = kind
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable


class Gateway:
    """One worker's gateway: cluster view, router state, upstream pool, predictor and hooks."""

    def __init__(
        self,
        settings: Settings,
        pools: list[PoolConfig],
        predictor: PredictorLike,
        metrics: GatewayMetrics | None = None,
        tracer: Any = None,
        worker_index: int = 0,
    ) -> None:
        self.settings = settings
        # The gateway terminates client auth: a gateway key must not reach the replicas, which get
        # the upstream key (if any) instead. Without either, the client's header passes unchanged.
        upstream_key = settings.upstream_api_key.get_secret_value()
        self._upstream_auth = b"Bearer " + upstream_key.encode() if upstream_key else b""
        self._replace_auth = bool(settings.api_keys.get_secret_value() or upstream_key)
        self._drop_raw = _DROP_REQUEST_RAW | {b"authorization"} if self._replace_auth else _DROP_REQUEST_RAW
        self.view = ClusterView.from_configs(pools)
        self.replicas: dict[str, ReplicaState] = {r.url: r for p in self.view.pools for r in p.replicas}
        self.routing_state = RoutingState()
        # workers start their rotations at different replicas, so N workers spread like one
        self.routing_state.round_robin.update({p.name: worker_index for p in self.view.pools})
        self.policy: Policy = make_policy(settings.policy)
        self.predictor = predictor
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.tracer = tracer
        self.monitor = ReplicaMonitor(
            self.view,
            self.routing_state,
            self.metrics,
            interval_s=settings.health_interval_s,
            timeout_s=settings.health_timeout_s,
            unhealthy_after=settings.unhealthy_after,
            scrape_interval_s=settings.metrics_scrape_interval_s,
            reconcile_prefix_index=settings.prefix_reconcile,
        )
        self.session: aiohttp.ClientSession | None = None  # passthrough calls (off the hot path)
        self.upstreams: dict[str, ReplicaPool] = {}  # completions: keep-alive pool per replica URL
        self._stats_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the worker's loop, once started
        self._error_log: dict[tuple[str, str], tuple[float, int]] = {}  # (replica, kind) -> (logged at, suppressed)
        # Hooks for the admission queue and the pre-warm sender; None = not installed.
        # admission: awaited when route() says the pool is saturated (Decision.queue); returns the final decision.
        # prewarm: called (sync, must not block) with a decision's PrewarmActions before the call is forwarded.
        # release_listeners: called (sync) each time a call leaves a replica, e.g. to wake queued calls.
        self.admission: AdmissionHook | None = None
        self.prewarm: PrewarmHook | None = None
        self.release_listeners: list[ReleaseListener] = []
        # rate_limit: awaited with each completion's token estimate (gateway.access); a Response = refuse with it.
        self.rate_limit: RateLimitHook | None = None
        # log_payload: called with the answer's bytes (a stream's first 16 KiB) when PYTHIA_LOG_PAYLOADS is on.
        self.log_payload: Callable[[web.Request, bytes], None] | None = None
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=settings.read_timeout_s
        )
        self._retries = settings.retries
        self._tag_len = settings.max_tag_length
        self._routing_headers = settings.routing_headers
        self._forward_priority = settings.forward_priority
        created = int(time.time())
        models = sorted({m for p in self.view.pools for m in p.models})
        self.models_body = orjson.dumps(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": created, "owned_by": "pythia"} for m in models],
            }
        )

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the upstream pool and start health checks, scraping and the predictor's background work."""
        self._loop = asyncio.get_running_loop()
        limit = self.settings.upstream_max_connections
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=limit,
            keepalive_timeout=self.settings.upstream_keepalive_s,
            ttl_dns_cache=None,
            use_dns_cache=True,
        )
        # aiohttp sets TCP_NODELAY on every connection it opens (client and server side).
        self.session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        await self.monitor.start()
        await self.predictor.start()
        self._stats_task = asyncio.create_task(self._export_predictor_stats(), name="predictor stats")

    async def _export_predictor_stats(self) -> None:
        """Copy predictor.stats() into /metrics once per scrape interval (off the hot path)."""
        stats = getattr(self.predictor, "stats", None)
        if stats is None:
            return
        while True:
            try:
                self.metrics.set_predictor_stats(stats())
            except Exception:
                log.exception("predictor stats failed")
            await asyncio.sleep(self.settings.metrics_scrape_interval_s)

    async def stop(self) -> None:
        await cancel_and_wait([self._stats_task])
        self._stats_task = None
        await self.monitor.stop()
        try:
            await self.predictor.stop()
        except Exception:
            log.exception("predictor stop failed")
        if self.session is not None:
            await self.session.close()
            self.session = None
        for pool in self.upstreams.values():
            pool.close()
        self.upstreams.clear()
        self.metrics.flush()  # counts still waiting for the next batched publish

    def set_replicas(self, urls_by_pool: Mapping[str, Sequence[str]]) -> bool:
        """Replace the replica lists of the named pools (discovery); survivors keep their state."""
        from gateway.discovery.reconcile import apply_discovered

        if not apply_discovered(self.view, urls_by_pool):
            return False
        gone = set(self.replicas)
        self.replicas = {r.url: r for p in self.view.pools for r in p.replicas}
        for url in gone - set(self.replicas):
            self.routing_state.prefix_index.forget(url)
            pool = self.upstreams.pop(url, None)
            if pool is not None:
                pool.close()
        if self.session is not None:  # started: watch the new set
            self.monitor.sync()
        log.info("replicas changed", extra={"pools": {p.name: len(p.replicas) for p in self.view.pools}})
        return True

    async def call_replica(self, url: str, path: str, body: bytes, timeout_s: float | None = None) -> tuple[int, bytes]:
        """POST a JSON body to one replica over the hot-path pool (for background senders such as pre-warm).

        Raises gateway.upstream.UpstreamError when the replica cannot be reached or stays silent.
        """
        replica = self.replicas.get(url)
        if replica is None:
            raise KeyError(url)
        pool = self._pool_for(replica)
        head = request_head(b"POST", path.encode(), pool.host_header, len(body), b"Content-Type: application/json\r\n")
        resp = await pool.request(head, body, timeout_s or self.settings.read_timeout_s)
        try:
            return resp.status, await resp.read_all()
        finally:
            resp.close()

    def ready(self) -> bool:
        """At least one replica is healthy."""
        return any(r.healthy for r in self.replicas.values())

    # -- completions -----------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.completion(request, True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.completion(request, False)

    async def completion(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """Handle POST /v1/chat/completions (chat=True) or /v1/completions."""
        t0 = time.monotonic()
        raw = await self._read_body(request)
        if not isinstance(raw, bytes):  # a refusal (checked against bytes: web.Response is an ABC, a slow check)
            return raw
        call = self._parse(request, raw, chat, t0)
        if not isinstance(call, _Call):
            return call
        if self.rate_limit is not None:
            f = call.features
            refused = await self.rate_limit(request, f.prompt_tokens + (f.max_tokens or 0))
            if refused is not None:
                self.metrics.request_done("", "", refused.status)
                return refused
        ctx, decision = self._decide(call)
        return await self._admit_and_proxy(request, call, ctx, decision)

    def begin_completion(
        self, request: Any, finish: Callable[[web.StreamResponse | None, Any], None], chat: bool
    ) -> web.StreamResponse | Coroutine[Any, Any, web.StreamResponse] | UpstreamExchange:
        """`completion` for the fast server path, run without a task as far as it can go.

        Returns the answer when there is one already (a refusal), the coroutine that finishes the call
        when it must wait (admission queue, a new upstream connection), or the exchange in flight, which
        calls `finish(answer, None)` when the answer is written or ready, or `finish(None, coroutine)`
        to have the rest run in a task (a 5xx or a failure to retry). Only called when no middleware,
        rate limit, tracer or payload log is installed (`fast_start`).
        """
        t0 = time.monotonic()
        if request._too_large:
            return self._too_large()
        call = self._parse(request, request._body, chat, t0)
        if not isinstance(call, _Call):
            return call
        ctx, decision = self._decide(call)
        if decision.queue:
            return self._admit_and_proxy(request, call, ctx, decision)
        payload = self._commit(call, decision)
        if not isinstance(payload, bytes):
            return payload
        replica = self.replicas[decision.replica]
        pool = self._pool_for(replica)
        conn = pool.take_idle()
        if conn is None:
            return self._proxy(request, ctx, decision, payload)
        return UpstreamExchange.start(self, request, ctx, decision, payload, replica, pool, conn, finish)

    def fast_start(self, handler: Any) -> Callable[[Any, Any], Any] | None:
        """`begin_completion` for the fast server path's `handler`, when it may replace it.

        Not when something is installed that only the coroutine runs (rate limits, tracing, payload logs)."""
        if self.rate_limit is not None or self.tracer is not None or self.log_payload is not None:
            return None
        if handler == self.chat_completions:
            return functools.partial(self.begin_completion, chat=True)
        if handler == self.completions:
            return functools.partial(self.begin_completion, chat=False)
        return None

    def _parse(self, request: Any, raw: bytes, chat: bool, t0: float) -> _Call | web.Response:
        """The body, tags and features of one call, or the 400 that refuses it."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return self._reject(400, "invalid_json", f"request body is not valid JSON: {e}")
        if not isinstance(body, dict):
            return self._reject(400, "invalid_request", "request body must be a JSON object")
        try:
            # the fast path hands over only the X-Pythia-* headers (no header map built per call)
            tag_headers = getattr(request, "tag_headers", None)
            tags, changed = read_tags(request.headers if tag_headers is None else tag_headers(), body, self._tag_len)
            features = extract_features(body, chat, t0)
            if chat:
                add_predictor_inputs(features, body, wants_linking(tags))
        except (TagError, InvalidRequest) as e:
            return self._reject(400, "invalid_tag" if isinstance(e, TagError) else "invalid_request", str(e), e.param)
        return _Call(raw, body, changed, tags, features, t0)

    def _decide(self, call: _Call) -> tuple[RoutingContext, Decision]:
        """Predict, then route."""
        try:
            prediction = self.predictor.predict(call.tags, call.features, call.t0)
        except Exception:  # the predictor degrades prediction, never a request
            log.exception("predict failed")
            prediction = Prediction()
        ctx = RoutingContext(call.features, call.tags, prediction, call.t0, self.routing_state)
        return ctx, route(ctx, self.view, self.policy)

    async def _admit_and_proxy(
        self, request: web.Request, call: _Call, ctx: RoutingContext, decision: Decision
    ) -> web.StreamResponse:
        if decision.queue:
            if self.admission is None:
                return self._reject(
                    503, "pool_saturated", f"pool '{decision.pool}' is saturated; retry shortly",
                    retry_after_s=NO_REPLICA_RETRY_AFTER_S, pool=decision.pool,
                )  # fmt: skip
            decision = await self.admission(ctx, decision)
        payload = self._commit(call, decision)
        if not isinstance(payload, bytes):
            return payload
        return await self._proxy(request, ctx, decision, payload)

    def _commit(self, call: _Call, decision: Decision) -> bytes | web.Response:
        """The bytes to forward once a replica is chosen (pre-warm sent), or the refusal the decision is."""
        if decision.error is not None:
            err = decision.error
            return self._reject(err.status, err.code, err.message, retry_after_s=err.retry_after_s, pool=decision.pool)
        if decision.prewarm and self.prewarm is not None:
            self.prewarm(decision.prewarm)
        raw, body, changed = call.raw, call.body, call.changed
        payload = raw
        if decision.priority is not None and self._forward_priority and body.get("priority") != decision.priority:
            if changed or "priority" in body:
                body["priority"] = decision.priority
                changed = True
            else:  # the usual case: add the field to the client's bytes instead of re-serializing the body
                payload = with_field(raw, bool(body), b"priority", decision.priority)
        if changed:
            payload = orjson.dumps(body)
        return payload

    async def _read_body(self, request: web.Request) -> bytes | web.Response:
        cl = request.content_length
        if cl is not None and cl > self.settings.body_limit_bytes:
            return self._too_large()
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()

    def _too_large(self) -> web.Response:
        return self._reject(413, "request_too_large", f"request body is larger than {self.settings.body_limit_bytes} bytes")

    def _reject(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        retry_after_s: float | None = None,
        pool: str = "",
    ) -> web.Response:
        self.metrics.request_done(pool, "", status)
        return error_response(status, code, message, param, retry_after_s)

    def _upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        """Client headers to pass on through aiohttp (passthrough calls)."""
        h = CIMultiDict(request.headers)
        for name in _DROP_REQUEST_HEADERS:
            h.popall(name, None)
        if self._replace_auth:
            h.popall("Authorization", None)
            if self._upstream_auth:
                h["Authorization"] = self._upstream_auth.decode()
        h["Content-Type"] = "application/json"
        return h

    def _forward_header_lines(self, request: web.Request) -> bytes:
        """Client header lines to pass on (raw bytes, ours and hop-by-hop removed), plus our Content-Type."""
        drop = self._drop_raw
        lines = [b"%s: %s\r\n" % (k, v) for k, v in request.raw_headers if k.lower() not in drop]
        if self._upstream_auth:
            lines.append(b"Authorization: %s\r\n" % self._upstream_auth)
        lines.append(b"Content-Type: application/json\r\n")
        return b"".join(lines)

    def _pool_for(self, replica: ReplicaState) -> ReplicaPool:
        pool = self.upstreams.get(replica.url)
        if pool is None:
            pool = self.upstreams[replica.url] = ReplicaPool(
                replica.url,
                self.settings.connect_timeout_s,
                self.settings.upstream_keepalive_s,
                self.settings.upstream_max_connections,
            )
        return pool

    async def _open(self, replica: ReplicaState, path: bytes, header_lines: bytes, payload: bytes) -> UpstreamResponse | _Attempt:
        """POST to one replica and wait for the answer's status and headers; a failure says whether to retry."""
        pool = self._pool_for(replica)
        head = request_head(b"POST", path, pool.host_header, len(payload), header_lines)
        try:
            resp = await pool.request(head, payload, self.settings.read_timeout_s)
        except UpstreamError as e:
            return self.failed_attempt(replica, e)
        self.answer_status(replica, resp.status)
        return resp

    def failed_attempt(self, replica: ReplicaState, e: UpstreamError) -> _Attempt:
        """Record an upstream failure before the answer's headers; what to tell the client and whether to retry."""
        if isinstance(e, ReadTimeout):
            self._upstream_error(replica.url, "read_timeout")
            return _Attempt("read_timeout", 504, "upstream_timeout", "upstream did not answer in time", False)
        if isinstance(e, ConnectTimeout):
            self.monitor.record_failure(replica, False, "connect timeout")
            self._upstream_error(replica.url, e.kind)
            return _Attempt(e.kind, 504, "upstream_timeout", "upstream connect timed out", True)
        # refused, unreachable, or closed before answering
        self.monitor.record_failure(replica, e.conclusive, e.kind)
        self._upstream_error(replica.url, e.kind)
        code = "upstream_unavailable" if isinstance(e, ConnectFailed) else "upstream_error"
        return _Attempt(e.kind, 502, code, f"upstream failed: {e}", True)

    def answer_status(self, replica: ReplicaState, status: int) -> None:
        """A replica answered with `status`: a 5xx counts against its health, anything else resets it."""
        if status >= 500:
            self.monitor.record_failure(replica, False, f"status {status}")
            self._upstream_error(replica.url, f"status_{status}")
        else:
            replica.consecutive_failures = 0

    async def _open_passthrough(
        self, replica: ReplicaState, method: str, url: str, payload: bytes | None, headers: CIMultiDict[str]
    ) -> aiohttp.ClientResponse | _Attempt:
        """Any method to any path through aiohttp (off the hot path); a failure says whether to retry."""
        assert self.session is not None
        try:
            resp = await self.session.request(method, url, data=payload, headers=headers)
        except aiohttp.ClientConnectorError as e:
            refused = isinstance(e.os_error, ConnectionRefusedError)
            self.monitor.record_failure(replica, refused, "connect")
            self._upstream_error(replica.url, "connect")
            return _Attempt("connect", 502, "upstream_unavailable", f"cannot connect to upstream: {e.strerror}", True)
        except aiohttp.ConnectionTimeoutError:
            self.monitor.record_failure(replica, False, "connect timeout")
            self._upstream_error(replica.url, "connect_timeout")
            return _Attempt("connect_timeout", 504, "upstream_timeout", "upstream connect timed out", True)
        except (TimeoutError, aiohttp.SocketTimeoutError):
            self._upstream_error(replica.url, "read_timeout")
            return _Attempt("read_timeout", 504, "upstream_timeout", "upstream did not answer in time", False)
        except aiohttp.ClientError as e:
            self.monitor.record_failure(replica, False, e.__class__.__name__)
            self._upstream_error(replica.url, "disconnect")
            return _Attempt("disconnect", 502, "upstream_error", f"upstream failed: {e.__class__.__name__}", True)
        return resp

    def hold(self, replica: ReplicaState, features: RequestFeatures, pred: Prediction, decision: Decision) -> Held:
        """Count a call in flight on `replica` (the KV the router sized it at, as the simulator books it)."""
        reserve = decision.kv_reserve_tokens or features.prompt_tokens + (pred.output_tokens_bound or features.max_tokens or 0)
        expected = decision.kv_expected_tokens
        replica.inflight += 1
        replica.inflight_prompt_tokens += features.prompt_tokens
        replica.reserved_kv_tokens += reserve
        replica.reserved_kv_expected_tokens += expected
        gauge = self.metrics.inflight_gauge(replica.pool, replica.url)
        gauge.inc()
        return Held(reserve, expected, gauge)

    def release(self, replica: ReplicaState, features: RequestFeatures, hold: Held) -> None:
        """The call left `replica`: undo `hold` and tell the listeners (queued calls may go now)."""
        replica.inflight -= 1
        replica.inflight_prompt_tokens -= features.prompt_tokens
        replica.reserved_kv_tokens -= hold.reserve
        replica.reserved_kv_expected_tokens -= hold.expected
        hold.gauge.dec()
        for listener in self.release_listeners:
            listener(replica)

    async def _proxy(
        self,
        request: web.Request,
        ctx: RoutingContext,
        decision: Decision,
        payload: bytes,
        first: UpstreamResponse | _Attempt | None = None,
        held: Held | None = None,
    ) -> web.StreamResponse:
        """Forward to the chosen replica (retrying elsewhere before the first byte) and relay the answer.

        `first` and `held`: an exchange started without a task (`UpstreamExchange`) hands over its first
        attempt's outcome (None: send again) with the replica's in-flight counts it took, still held.
        """
        features = ctx.features
        pred = ctx.prediction
        header_lines = self._forward_header_lines(request)
        path = request.raw_path.encode()
        span = self._start_span(ctx, decision) if self.tracer is not None else None
        attempt = 0
        status = 0
        replica = self.replicas[decision.replica]
        try:
            while True:
                replica = self.replicas[decision.replica]
                hold = held if held is not None else self.hold(replica, features, pred, decision)
                held = None
                try:
                    if first is not None:
                        result, first = first, None
                    else:
                        result = await self._open(replica, path, header_lines, payload)
                    if isinstance(result, UpstreamResponse) and (result.status < 500 or attempt >= self._retries):
                        return_value, status, ttft = await self._relay(request, result, ctx, decision, replica)
                        break
                    if isinstance(result, UpstreamResponse):
                        result.close()
                        failure = _Attempt("status", result.status, "upstream_error", "", True)
                    else:
                        failure = result
                finally:
                    self.release(replica, features, hold)
                if not failure.retryable or attempt >= self._retries:
                    status = failure.status
                    self.metrics.request_done(decision.pool, replica.url, status)
                    self._finish_span(span, status)
                    return error_response(failure.status, failure.code, failure.message)
                attempt += 1
                self.metrics.retry(decision.pool, failure.kind)
                ctx.exclude = ctx.exclude | {replica.url}
                decision = route(ctx, self.view, self.policy)
                if decision.error is not None or decision.queue:
                    status = failure.status
                    self.metrics.request_done(decision.pool, replica.url, status)
                    self._finish_span(span, status)
                    return error_response(failure.status, failure.code, failure.message or "upstream failed")
        except asyncio.CancelledError:
            # the client went away: _relay closed the unfinished upstream answer, so vLLM aborts it too
            self.metrics.request_done(decision.pool, replica.url, 499)
            self._finish_span(span, 499)
            raise
        self.metrics.request_finished(decision.pool, replica.url, status, ttft, time.monotonic() - features.arrival_s)
        if span is not None:
            self._finish_span(span, status)
        return return_value

    def _response_header_lines(self, resp: UpstreamResponse, decision: Decision, replica: ReplicaState) -> bytes:
        """The upstream's response headers to pass on, as raw lines (for the fast server path)."""
        lines = b"".join([b"%s: %s\r\n" % (k, v) for k, v in resp.raw_headers if k.lower() not in _DROP_RESPONSE_RAW])
        if self._routing_headers:
            lines += b"x-pythia-pool: %s\r\nx-pythia-replica: %s\r\n" % (
                decision.pool.encode("latin-1"), replica.url.encode("latin-1"),
            )  # fmt: skip
        return lines

    def _response_headers(self, resp: UpstreamResponse, decision: Decision, replica: ReplicaState) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        for k, v in resp.raw_headers:
            if k.lower() not in _DROP_RESPONSE_RAW:
                headers.add(k.decode("latin-1"), v.decode("latin-1"))
        if self._routing_headers:
            headers["x-pythia-pool"] = decision.pool
            headers["x-pythia-replica"] = replica.url
        return headers

    async def _relay(
        self,
        request: web.Request,
        resp: UpstreamResponse,
        ctx: RoutingContext,
        decision: Decision,
        replica: ReplicaState,
    ) -> tuple[web.StreamResponse, int, float]:
        """Send the upstream answer to the client; returns (response, status for metrics, ttft or -1)."""
        features = ctx.features
        # the fast server path (gateway.fastpath) takes raw header lines: no header map per call
        raw_response = getattr(request, "raw_response", None)
        raw_stream = getattr(request, "raw_stream_response", None)
        status = resp.status
        try:
            ctype = resp.header(b"content-type") or b""
            if not ctype.startswith(b"text/event-stream"):
                try:
                    data = await resp.read_all()
                except UpstreamError as e:
                    self._upstream_error(replica.url, e.kind)
                    failed = upstream_failure_response(e, isinstance(e, ReadTimeout))
                    return failed, failed.status, -1.0
                ttft = time.monotonic() - features.arrival_s
                # learning from the answer waits until it has been written to the client: the callback
                # runs at the start of the next loop iteration, before any new request is read
                loop = self._loop  # kept: get_running_loop() costs a getpid() call
                if loop is None or not loop.is_running():
                    loop = asyncio.get_running_loop()
                loop.call_soon(self._observe_answer, ctx, decision, replica, status, data, ttft)
                if self.log_payload is not None:
                    self.log_payload(request, data)
                if raw_response is not None:
                    return raw_response(status, self._response_header_lines(resp, decision, replica), data), status, ttft
                headers = self._response_headers(resp, decision, replica)
                return web.Response(status=status, body=data, headers=headers), status, ttft
            try:
                chunk = await resp.next_chunk()
            except UpstreamError as e:  # nothing reached the client yet: a plain error answer
                self._upstream_error(replica.url, e.kind)
                failed = upstream_failure_response(e, isinstance(e, ReadTimeout))
                return failed, failed.status, -1.0
            ttft = time.monotonic() - features.arrival_s
            # the fast server path (gateway.fastpath) writes streams to its own connection
            out: web.StreamResponse
            if raw_stream is not None:
                out = raw_stream(status, self._response_header_lines(resp, decision, replica))
            else:
                out = _SSEResponse(status=status, headers=self._response_headers(resp, decision, replica))
            events = 0
            prev = last = b""
            ok = True
            eof_sent = False
            # the stream's first bytes, kept (by reference) for the output fingerprint of untagged calls
            head: list[bytes] | None = [] if wants_linking(ctx.tags) or self.log_payload is not None else None
            head_len = 0
            try:
                await out.prepare(request)
                while chunk is not None:
                    events += chunk.count(b"data:")
                    prev, last = last, chunk
                    if head is not None and head_len < KEEP_STREAM_BYTES:
                        head.append(chunk)
                        head_len += len(chunk)
                    if resp.at_end:  # last bytes: send them with the stream's end in one write
                        eof_sent = True
                        await out.write_eof(chunk)
                        break
                    await out.write(chunk)
                    chunk = await resp.next_chunk()
            except ConnectionError:
                # the client went away mid-stream; closing the unfinished upstream answer (finally) aborts it there
                self._observe(ctx, decision, replica, False, None, max(0, events - 2), ttft)
                return out, 499, ttft
            except UpstreamError as e:
                # upstream broke mid-stream: end the SSE stream cleanly with an error event
                ok = False
                self._upstream_error(replica.url, e.kind)
                with contextlib.suppress(ConnectionError):
                    await out.write(sse_error_after(last or prev, "upstream_" + e.kind, "the upstream stream ended early"))
                status = 502
            if not eof_sent:
                with contextlib.suppress(ConnectionError):
                    await out.write_eof()
            out_fp = stream_fingerprint(b"".join(head), bool(features.messages)) if head and ok else ""
            self._observe(ctx, decision, replica, ok, find_usage(prev + last), max(0, events - 2), ttft, out_fp)
            if self.log_payload is not None and head is not None:
                self.log_payload(request, b"".join(head))
            return out, status, ttft
        finally:
            resp.close()

    def _observe_answer(
        self, ctx: RoutingContext, decision: Decision, replica: ReplicaState, status: int, data: bytes, ttft: float
    ) -> None:
        """Observe a non-streamed answer: its usage, and for untagged calls its text's fingerprint."""
        try:
            out_fp = ""
            usage = None
            if status < 400:
                if wants_linking(ctx.tags):  # parse the answer once for both its text and its usage
                    usage, out_fp = answer_usage_and_fingerprint(data, bool(ctx.features.messages))
                    if usage is None:
                        usage = find_usage(data)
                else:
                    usage = find_usage(data)
            self._observe(ctx, decision, replica, status < 400, usage, 0, ttft, out_fp)
        except Exception:
            log.exception("observe failed")

    def _observe(
        self,
        ctx: RoutingContext,
        decision: Decision,
        replica: ReplicaState,
        ok: bool,
        usage: dict[str, Any] | None,
        events_estimate: int,
        ttft: float,
        output_fingerprint: str = "",
    ) -> None:
        f = ctx.features
        prompt, output, cached = f.prompt_tokens, events_estimate, 0
        if usage is not None:
            prompt = int(usage.get("prompt_tokens") or prompt)
            output = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                cached = int(details.get("cached_tokens") or 0)
        now = time.monotonic()
        outcome = Outcome(
            ok=ok,
            prompt_tokens=prompt,
            output_tokens=output,
            cached_tokens=cached,
            ttft_s=max(0.0, ttft),
            e2e_s=now - f.arrival_s,
            finished_s=now,
            replica=replica.url,
            pool=decision.pool,
            output_fingerprint=output_fingerprint,
        )
        try:
            self.predictor.observe(ctx.tags, f, ctx.prediction, outcome)
        except Exception:
            log.exception("observe failed")

    def _upstream_error(self, replica: str, kind: str) -> None:
        """Count an upstream failure; log it at most once per replica and kind every LOG_EVERY_S."""
        self.metrics.upstream_error(replica, kind)
        key = (replica, kind)
        now = time.monotonic()
        last, suppressed = self._error_log.get(key, (-LOG_EVERY_S, 0))
        if now - last >= LOG_EVERY_S:
            self._error_log[key] = (now, 0)
            log.warning("upstream error", extra={"replica": replica, "kind": kind, "suppressed": suppressed})
        else:
            self._error_log[key] = (last, suppressed + 1)

    # -- tracing ---------------------------------------------------------------------------------
    def _start_span(self, ctx: RoutingContext, decision: Decision) -> Any:
        p = ctx.prediction
        return self.tracer.start_span(
            "pythia.request",
            attributes={
                "pythia.pool": decision.pool,
                "pythia.replica": decision.replica,
                "pythia.policy": self.policy.name,
                "pythia.reason": decision.reason,
                "pythia.priority": -1 if decision.priority is None else decision.priority,
                "pythia.app": ctx.tags.app,
                "pythia.workflow": ctx.tags.workflow or p.workflow,
                "pythia.agent": ctx.tags.agent or p.role,
                "pythia.prediction.cold": p.cold,
                "pythia.prediction.remaining_steps": p.remaining_steps,
                "pythia.prediction.output_tokens_bound": p.output_tokens_bound,
                "pythia.prompt_tokens": ctx.features.prompt_tokens,
                "pythia.stream": ctx.features.stream,
            },
        )

    def _finish_span(self, span: Any, status: int) -> None:
        if span is not None:
            span.set_attribute("http.response.status_code", status)
            span.end()

    # -- other endpoints -------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=self.models_body, content_type="application/json")

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Any other /v1/* call: forwarded unchanged to a healthy replica serving the body's model."""
        raw = await self._read_body(request)
        if isinstance(raw, web.Response):
            return raw
        model = ""
        if raw[:1] == b"{":  # JSON whatever the declared type: clients often omit Content-Type
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = None
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                model = body["model"]
        pools = [p for p in self.view.pools if p.serves(model)]
        if not pools:
            return self._reject(404, "model_not_found", f"The model '{model}' does not exist")
        headers = self._upstream_headers(request)
        if request.content_type:
            headers["Content-Type"] = request.content_type
        else:
            headers.popall("Content-Type", None)
        tried: set[str] = set()
        for _ in range(self._retries + 1):
            candidates = [r for p in pools for r in p.replicas if r.healthy and r.url not in tried]
            if not candidates:
                break
            n = self.routing_state.round_robin.get("passthrough", 0)
            self.routing_state.round_robin["passthrough"] = n + 1
            replica = candidates[n % len(candidates)]
            tried.add(replica.url)
            result = await self._open_passthrough(
                replica, request.method, replica.url + request.raw_path, raw or None, headers
            )
            if isinstance(result, _Attempt):
                if result.retryable:
                    continue
                return self._reject(result.status, result.code, result.message, pool=replica.pool)
            try:
                headers_out = CIMultiDict(
                    (k, v) for k, v in result.headers.items() if k.lower() not in _DROP_RESPONSE_HEADERS
                )
                out = web.StreamResponse(status=result.status, headers=headers_out)
                await out.prepare(request)
                try:
                    async for chunk in result.content.iter_any():
                        await out.write(chunk)
                except (TimeoutError, aiohttp.ClientError):
                    self._upstream_error(replica.url, "disconnect")
                await out.write_eof()
                self.metrics.request_done(replica.pool, replica.url, result.status)
                return out
            finally:
                result.close()
        return self._reject(
            503, "no_healthy_replica", "No healthy replica can take the request; retry shortly",
            retry_after_s=NO_REPLICA_RETRY_AFTER_S,
        )  # fmt: skip
