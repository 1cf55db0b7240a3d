"""Replica health and load view: active /health checks, passive failure counting, /metrics scraping.

Each worker keeps its own view (no cross-process locks); every check writes straight
into the `ReplicaState` objects the router reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from gateway.metrics import GatewayMetrics
from gateway.scrape import parse_vllm_metrics
from pools.routing.base import RoutingState
from pools.routing.reconcile import after_scrape, index_share_ratio
from pools.types import ClusterView, ReplicaState

log = logging.getLogger("pythia.health")


class ReplicaMonitor:
    """Marks replicas up and down and keeps their scraped engine stats fresh."""

    def __init__(
        self,
        view: ClusterView,
        routing_state: RoutingState,
        metrics: GatewayMetrics | None,
        *,
        interval_s: float,
        timeout_s: float,
        unhealthy_after: int,
        scrape_interval_s: float,
        reconcile_prefix_index: bool = False,
    ) -> None:
        self.view = view
        self.routing_state = routing_state
        self.reconcile_prefix_index = reconcile_prefix_index  # correct the prefix index from scraped hit counters
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.unhealthy_after = unhealthy_after
        self.scrape_interval_s = scrape_interval_s
        self._tasks: dict[str, tuple[asyncio.Task[None], asyncio.Task[None]]] = {}
        self._session: aiohttp.ClientSession | None = None

    def replicas(self) -> list[ReplicaState]:
        return [r for p in self.view.pools for r in p.replicas]

    # -- passive signals from the proxy -------------------------------------------------------
    def record_success(self, r: ReplicaState) -> None:
        """A check or a proxied call went well: the replica is (back) up."""
        r.consecutive_failures = 0
        if not r.healthy:
            r.healthy = True
            # it probably restarted: its prefix cache is empty
            self.routing_state.prefix_index.forget(r.url)
            log.info("replica up", extra={"replica": r.url, "pool": r.pool})
            if self.metrics is not None:
                self.metrics.set_healthy(r.pool, r.url, True)

    def record_failure(self, r: ReplicaState, conclusive: bool, why: str) -> None:
        """A check or call failed; refused connections take a replica out at once, others after a streak."""
        r.consecutive_failures += 1
        if r.healthy and (conclusive or r.consecutive_failures >= self.unhealthy_after):
            r.healthy = False
            log.warning("replica down", extra={"replica": r.url, "pool": r.pool, "why": why})
            if self.metrics is not None:
                self.metrics.set_healthy(r.pool, r.url, False)

    # -- background loops ------------------------------------------------------------------------
    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30.0),
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
        )
        self.sync()

    def sync(self) -> None:
        """Watch exactly the replicas now in the view (call after the replica set changed)."""
        current = {r.url: r for r in self.replicas()}
        for url in list(self._tasks):
            if url not in current:
                for t in self._tasks.pop(url):
                    t.cancel()
        for url, r in current.items():
            if url in self._tasks:
                continue
            if self.metrics is not None:
                self.metrics.set_healthy(r.pool, r.url, r.healthy)
            self._tasks[url] = (
                asyncio.create_task(self._health_loop(r), name=f"health {url}"),
                asyncio.create_task(self._scrape_loop(r), name=f"scrape {url}"),
            )

    async def stop(self) -> None:
        tasks = [t for pair in self._tasks.values() for t in pair]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check_once(self, r: ReplicaState) -> bool:
        """One GET /health; updates the replica's state and says whether it passed."""
        assert self._session is not None
        try:
            async with self._session.get(r.url + "/health") as resp:
                await resp.read()
                ok = resp.status == 200
            if ok:
                self.record_success(r)
            else:
                self.record_failure(r, False, f"health status {resp.status}")
            return ok
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as e:
            self.record_failure(r, True, f"connect: {e.__class__.__name__}")
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            self.record_failure(r, False, f"health: {e.__class__.__name__}")
        return False

    async def scrape_once(self, r: ReplicaState) -> bool:
        """One GET /metrics into the replica's engine fields; False when it could not be read."""
        assert self._session is not None
        try:
            async with self._session.get(r.url + "/metrics") as resp:
                if resp.status != 200:
                    return False
                text = await resp.text()
        except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
            return False
        s = parse_vllm_metrics(text)
        if s.num_running is not None:
            r.num_running = int(s.num_running)
        if s.num_waiting is not None:
            r.num_waiting = int(s.num_waiting)
        if s.kv_usage is not None:
            r.kv_usage = s.kv_usage
        if s.prefix_cache_queries is not None:
            r.prefix_cache_queries = s.prefix_cache_queries
        if s.prefix_cache_hits is not None:
            r.prefix_cache_hits = s.prefix_cache_hits
        if s.num_preemptions is not None:
            r.num_preemptions = s.num_preemptions
        if s.max_num_seqs is not None:
            r.max_num_seqs = s.max_num_seqs
        capacity_changed = s.kv_capacity_tokens is not None and s.kv_capacity_tokens != r.kv_capacity_tokens
        if s.kv_capacity_tokens is not None:
            r.kv_capacity_tokens = s.kv_capacity_tokens
        # the same index sizing and restart handling the virtual-time harness applies after its scrapes
        after_scrape(self.routing_state, r, capacity_changed, self.reconcile_prefix_index)
        ratio = index_share_ratio(self.routing_state, r)
        if ratio is not None and self.metrics is not None:
            self.metrics.set_prefix_index_share(r.url, ratio)
        r.last_scrape_s = time.monotonic()
        return True

    async def _health_loop(self, r: ReplicaState) -> None:
        while True:
            started = time.monotonic()
            await self.check_once(r)
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def _scrape_loop(self, r: ReplicaState) -> None:
        while True:
            started = time.monotonic()
            if r.healthy:
                await self.scrape_once(r)
            await asyncio.sleep(max(0.0, self.scrape_interval_s - (time.monotonic() - started)))
