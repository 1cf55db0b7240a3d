"""The gateway's admission queue (Pythia mechanism 4, asyncio side).

When `route()` answers `Decision.queue` (no replica of the pool may take the call now), the call
waits here instead of piling onto a replica: one `pools.admission.AdmissionQueue` per pool, ordered
by the call's lookahead priority with aging. Each time a call leaves a replica (a release listener)
the head of that pool's queue is routed again and, once placed, goes on to the proxy; a periodic
drain catches capacity that appears without a release (a scrape, a replica back to health).

A call handed a replica holds a provisional reservation on it until its own coroutine resumes and
the proxy takes over the counts, so calls arriving meanwhile cannot take the same room twice.

Each replica's concurrency is also bounded (`ConcurrencyBoundFilter`, added to the policy's
filters): at most `pools.admission.concurrency_limit` calls at once, from the scraped `max_num_seqs`
and, for policies without their own per-call KV filter, how many of the pool's typical calls its KV
capacity holds. Calls beyond it wait here in priority order rather than in the engine's own queue.

A call waits for room at most `admission_timeout_s`; then it is routed without the room filters
(the KV-capacity and concurrency bounds) and waits in the engine's own queue instead, as behind a
router without an admission queue: a busy pool makes calls slower, never fails them. Only a full
queue (429) or a pool with no healthy replica (503) refuses a call; a client that goes away is
removed from the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram

from gateway.proxy import Gateway
from gateway.tasks import cancel_and_wait
from pools.admission import DEFAULT_CONCURRENCY, AdmissionQueue, overflow_policy
from pools.routing import Decision, Policy, RoutingContext, route
from pools.routing.base import RouteError
from pools.routing.filters import kv_capacity
from pools.routing.kv import call_kv
from pools.types import ReplicaState

log = logging.getLogger("pythia.admission")

KV_FILTER = kv_capacity.NAME
DRAIN_INTERVAL_S = 0.25  # periodic re-try of queued calls (capacity seen by a scrape, a replica back)
TYPICAL_EWMA = 0.05  # weight of one call in the pool's typical call size
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def admission_enabled(mode: str, policy: Policy) -> bool:
    """`auto` turns the queue on for policies that set priorities (Pythia), as the simulator does."""
    return mode == "on" or (mode == "auto" and policy.priority is not None)


@dataclass(slots=True)
class _Ticket:
    """One waiting call: what to route again, and where its coroutine waits for the decision."""

    ctx: RoutingContext
    future: asyncio.Future[Decision]
    pool: str
    enqueued: float
    held: Decision | None = None  # the decision whose provisional reservation this call holds


class TypicalCallSize:
    """Per pool, a moving average of the KV tokens a call is expected to occupy (prompt + expected output)."""

    def __init__(self, default_tokens: int = 4096) -> None:
        self.default = float(default_tokens)
        self.by_pool: dict[str, float] = {}

    def record(self, ctx: RoutingContext, chosen: ReplicaState) -> None:
        """After-pick hook: fold this call into its pool's average."""
        x = float(call_kv(ctx)[1])  # call_kv_expected(ctx), which route() has worked out already
        pool = chosen.pool
        old = self.by_pool.get(pool)
        self.by_pool[pool] = x if old is None else old + TYPICAL_EWMA * (x - old)

    def tokens(self, pool: str) -> int:
        return int(self.by_pool.get(pool, self.default))


class ConcurrencyBoundFilter:
    """Drops replicas already running as many calls as they can hold at once (`concurrency_limit`).

    With `kv_aware` the bound is the engine's `max_num_seqs` and how many typical calls its KV cache
    holds; without (the policy has its own per-call KV-capacity filter, as Pythia's does) it is the
    engine's batch limit alone, so calls beyond it wait here in priority order rather than in the
    engine's queue. An idle replica always stays (a call larger than the cache still has to run somewhere).
    """

    name = "concurrency-bound"

    def __init__(self, typical: TypicalCallSize, kv_aware: bool = True) -> None:
        self.typical = typical
        self.kv_aware = kv_aware

    def filter(self, ctx: RoutingContext, candidates: list[ReplicaState]) -> list[ReplicaState]:
        if not candidates:
            return candidates
        typical = self.typical.tokens(candidates[0].pool) if self.kv_aware else 0
        # keeps r when r.inflight == 0 or r.inflight < concurrency_limit(r, typical), with that limit
        # worked out inline: this runs for every candidate of every call (a function call each was
        # most of its cost); tests/unit/test_gateway_admission.py checks it against concurrency_limit
        out: list[ReplicaState] = []
        for r in candidates:
            n = r.inflight
            if n == 0:
                out.append(r)
                continue
            limit = r.max_num_seqs or DEFAULT_CONCURRENCY
            if typical > 0:
                cap = r.kv_capacity_tokens
                if cap > 0 and cap // typical < limit:
                    limit = cap // typical
            if n < limit or n < 1:  # n < max(1, limit)
                out.append(r)
        return out


class AdmissionController:
    """Installs itself on a `Gateway`: the admission hook, a release listener and the concurrency bound."""

    def __init__(self, gw: Gateway) -> None:
        s = gw.settings
        self.gw = gw
        self.timeout_s = s.admission_timeout_s
        self.aging_s = s.admission_aging_s
        self.max_queue = s.admission_max_queue
        self.queues: dict[str, AdmissionQueue[_Ticket]] = {}
        self.typical = TypicalCallSize()
        self._task: asyncio.Task[None] | None = None
        reg = gw.metrics.registry
        self.m_queued = Counter("pythia_admission_queued", "Calls that waited in the admission queue", ["pool"],
                                registry=reg)
        self.m_outcome = Counter("pythia_admission_outcomes", "How queued calls left the queue", ["pool", "outcome"],
                                 registry=reg)
        self.m_wait = Histogram("pythia_admission_wait_seconds", "Time calls spent in the admission queue", ["pool"],
                                buckets=WAIT_BUCKETS, registry=reg)
        self.m_depth = Gauge("pythia_admission_queue_depth", "Calls waiting in the admission queue now", ["pool"],
                             multiprocess_mode="livesum", registry=reg)

    def install(self) -> None:
        """Hook into the gateway: queue saturated calls, wake them on release, bound per-replica concurrency."""
        gw = self.gw
        gw.admission = self.admit
        gw.release_listeners.append(self.on_release)
        policy = gw.policy
        # right after the health filter, so the KV filter's per-candidate stash matches what it returns
        filters = list(policy.filters)
        kv_filtered = any(f.name == KV_FILTER for f in filters)
        filters.insert(1 if filters else 0, ConcurrencyBoundFilter(self.typical, kv_aware=not kv_filtered))
        policy.filters = tuple(filters)
        policy.after_pick = (*policy.after_pick, self.typical.record)
        # for a call that waited `timeout_s`: the same policy without the room filters
        self.overflow_policy = overflow_policy(policy, (KV_FILTER, ConcurrencyBoundFilter.name))

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain_loop(), name="pythia-admission-drain")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None
        for name, q in self.queues.items():
            while (w := q.pop()) is not None:
                if not w.item.future.done():
                    w.item.future.set_result(_error(name, 503, "shutting_down", "the gateway is shutting down"))

    def depth(self) -> dict[str, int]:
        """Calls waiting per pool (this worker)."""
        return {name: len(q) for name, q in self.queues.items()}

    # -- the hook ----------------------------------------------------------------------------------
    async def admit(self, ctx: RoutingContext, decision: Decision) -> Decision:
        """Wait until the call can be placed; returns the decision to proxy with (or an error decision)."""
        pool = decision.pool
        q = self.queues.get(pool)
        if q is None:
            q = self.queues[pool] = AdmissionQueue(aging_s=self.aging_s, max_len=self.max_queue)
        now = time.monotonic()
        ticket = _Ticket(ctx, asyncio.get_running_loop().create_future(), pool, now)
        if q.push(ticket, decision.priority, now) is None:
            self.m_outcome.labels(pool, "full").inc()
            return _error(pool, 429, "admission_queue_full", f"pool '{pool}' has too many calls waiting; retry shortly")
        self.m_queued.labels(pool).inc()
        self.m_depth.labels(pool).inc()
        try:
            done, _ = await asyncio.wait((ticket.future,), timeout=self.timeout_s)
        except asyncio.CancelledError:  # the client went away
            self._leave(q, ticket, "abandoned")
            raise
        if not done:
            self._leave(q, ticket, "overflowed")
            self.m_wait.labels(pool).observe(time.monotonic() - ticket.enqueued)
            return self._overflow(ticket)
        result = ticket.future.result()
        self._release_hold(ticket)  # the proxy takes over the counts now, without an await in between
        self.m_wait.labels(pool).observe(time.monotonic() - ticket.enqueued)
        self.m_outcome.labels(pool, "admitted" if result.error is None else "error").inc()
        return result

    def _overflow(self, ticket: _Ticket) -> Decision:
        """Route a call that waited `timeout_s` without the room filters: the engine queues it instead."""
        ctx = ticket.ctx
        _reset(ctx)
        d = route(ctx, self.gw.view, self.overflow_policy)
        if d.queue:  # no filter left that could ask for it; kept so a call can never hang here
            return _error(ticket.pool, 503, "queue_timeout", f"pool '{ticket.pool}' cannot take the call now")
        return d

    def _leave(self, q: AdmissionQueue[_Ticket], ticket: _Ticket, outcome: str) -> None:
        """A call gives up waiting: out of the queue, or, if it was just placed, give its room back."""
        if ticket.future.done() and not ticket.future.cancelled():
            self._release_hold(ticket)
            self.drain(ticket.pool)  # the room it held can go to the next call
        else:
            ticket.future.cancel()
            if q.remove(ticket):
                self.m_depth.labels(ticket.pool).dec()
        self.m_outcome.labels(ticket.pool, outcome).inc()

    # -- waking ------------------------------------------------------------------------------------
    def on_release(self, replica: ReplicaState) -> None:
        """Release listener: a call left `replica`, so its pool may admit the next waiting calls."""
        if self.queues.get(replica.pool):
            self.drain(replica.pool)

    def drain(self, pool: str) -> int:
        """Place queued calls of `pool` in priority order until one must still wait; returns how many left."""
        q = self.queues.get(pool)
        n = 0
        while q:
            w = q.pop()
            if w is None:
                break
            t = w.item
            if t.future.done():  # gave up already (removed lazily)
                self.m_depth.labels(pool).dec()
                continue
            ctx = t.ctx
            _reset(ctx)
            d = route(ctx, self.gw.view, self.gw.policy)
            if d.queue:
                q.requeue(w)
                break
            if d.error is None:
                self._hold(t, d)
            t.future.set_result(d)
            self.m_depth.labels(pool).dec()
            n += 1
        return n

    def drain_all(self) -> None:
        for name in list(self.queues):
            self.drain(name)

    async def _drain_loop(self) -> None:
        while True:
            await asyncio.sleep(DRAIN_INTERVAL_S)
            try:
                self.drain_all()
            except Exception:
                log.exception("admission drain failed")

    # -- provisional reservations ------------------------------------------------------------------
    def _hold(self, t: _Ticket, d: Decision) -> None:
        r = self.gw.replicas.get(d.replica)
        if r is None:
            return
        t.held = d
        r.inflight += 1
        r.reserved_kv_tokens += d.kv_reserve_tokens
        r.reserved_kv_expected_tokens += d.kv_expected_tokens

    def _release_hold(self, t: _Ticket) -> None:
        d, t.held = t.held, None
        if d is None:
            return
        r = self.gw.replicas.get(d.replica)
        if r is None:
            return
        r.inflight -= 1
        r.reserved_kv_tokens -= d.kv_reserve_tokens
        r.reserved_kv_expected_tokens -= d.kv_expected_tokens


def _error(pool: str, status: int, code: str, message: str) -> Decision:
    return Decision(pool=pool, error=RouteError(status, code, message, 1.0), reason=code)


def _reset(ctx: RoutingContext) -> None:
    """Forget what an earlier `route()` of this call filled in, to route it again now."""
    ctx.now = time.monotonic()
    ctx.pool = None
    ctx.prefix_match = None
    ctx.kv_free = None
