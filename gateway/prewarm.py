"""Proactive pre-warm sender (Pythia mechanism 5, asyncio side).

The routing core decides *what* to warm where (`pools.prewarm.choose_prewarm` ->
`Decision.prewarm`); this module sends it: a `max_tokens=1` chat completion of the predicted
next prefix to the chosen replica, over the gateway's keep-alive pool. The hook only puts the
action on a bounded queue (never an await on the request's path); a few background workers
send them. A `pools.prewarm.PrewarmLedger` matches every later call against the open warms on
its replica, so `/metrics` counts warms sent, used and wasted (no call used them within the TTL).
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from prometheus_client import Counter

from gateway.proxy import Gateway
from gateway.tasks import cancel_and_wait
from gateway.upstream import UpstreamError
from pools.prewarm import PrewarmLedger
from pools.routing import PrewarmAction, RoutingContext
from pools.types import ReplicaState

log = logging.getLogger("pythia.prewarm")

QUEUE_PER_WORKER = 64  # actions waiting to be sent; beyond it a warm is dropped (it would arrive too late)
EXPIRE_INTERVAL_S = 5.0


class PrewarmSender:
    """Installs itself as `gateway.prewarm`; sends warms with bounded concurrency and counts their use."""

    def __init__(self, gw: Gateway) -> None:
        s = gw.settings
        self.gw = gw
        self.concurrency = s.prewarm_concurrency
        self.timeout_s = s.prewarm_timeout_s
        self.ledger = PrewarmLedger()
        self._queue: asyncio.Queue[PrewarmAction] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._counted = {"used": 0, "wasted": 0}
        reg = gw.metrics.registry
        self.m = Counter("pythia_prewarm", "Pre-warm prefills by outcome: sent, failed, dropped, used, wasted",
                         ["outcome"], registry=reg)

    def install(self) -> None:
        """Hook into the gateway: take decisions' pre-warm actions; watch each placed call for warm use."""
        self.gw.prewarm = self.submit
        policy = self.gw.policy
        policy.after_pick = (*policy.after_pick, self.observe_call)

    async def start(self) -> None:
        if self._tasks:
            return
        self._queue = asyncio.Queue(QUEUE_PER_WORKER)
        self._tasks = [asyncio.create_task(self._worker(), name=f"pythia-prewarm-{i}") for i in range(self.concurrency)]
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="pythia-prewarm-expire"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
        self._queue = None

    # -- hooks (sync, on the request's path: no awaits, no I/O) -----------------------------------
    def submit(self, actions: tuple[PrewarmAction, ...]) -> None:
        """`gateway.prewarm`: queue the warms; a full queue drops them (counted)."""
        q = self._queue
        for a in actions:
            if q is None:
                self.m.labels("dropped").inc()
                continue
            try:
                q.put_nowait(a)
            except asyncio.QueueFull:
                self.m.labels("dropped").inc()

    def observe_call(self, ctx: RoutingContext, chosen: ReplicaState) -> None:
        """After-pick hook: a call placed on `chosen` uses an open warm there when it shares its prefix."""
        if self.ledger.sent and ctx.features.prefix_hashes:
            self.ledger.observe_call(chosen.url, ctx.features.prefix_hashes, time.monotonic())
            self._sync_counts()

    # -- background --------------------------------------------------------------------------------
    async def _worker(self) -> None:
        assert self._queue is not None
        q = self._queue
        while True:
            a = await q.get()
            try:
                await self.send(a)
            except Exception:
                log.exception("pre-warm failed")

    async def send(self, a: PrewarmAction) -> bool:
        """Send one warm now; True when the replica accepted it."""
        body = orjson.dumps({"model": a.model, "messages": list(a.messages), "max_tokens": 1, "stream": False})
        try:
            status, _ = await self.gw.call_replica(a.replica, "/v1/chat/completions", body, self.timeout_s)
        except (UpstreamError, KeyError, OSError):
            status = 0
        if not 200 <= status < 300:
            self.m.labels("failed").inc()
            return False
        self.ledger.record(a, time.monotonic())
        self.m.labels("sent").inc()
        self._sync_counts()
        return True

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_S)
            self.ledger.expire(time.monotonic())
            self._sync_counts()

    def _sync_counts(self) -> None:
        """Move the ledger's used/wasted totals into the Prometheus counters (they only grow)."""
        for name in ("used", "wasted"):
            now = getattr(self.ledger, name)
            delta = now - self._counted[name]
            if delta > 0:
                self.m.labels(name).inc(delta)
                self._counted[name] = now

    def stats(self) -> dict[str, int]:
        return {"sent": self.ledger.sent, "used": self.ledger.used, "wasted": self.ledger.wasted}
