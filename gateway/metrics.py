"""Prometheus metrics of the gateway, correct across worker processes.

`pythia serve` sets PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client,
so every worker writes its samples to mmap files and `/metrics` (served by any worker)
merges them all. An mmap write (with its lock) per sample cost more than a quarter of
a request's CPU, so the hot path only adds to plain in-process counters; they are
published once per event-loop iteration (`flush`, scheduled with call_soon), i.e. in
batches under load and within the same iteration when idle.
"""

from __future__ import annotations

import asyncio
import bisect
import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_mp

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_SETTLE_S = 0.05  # /metrics waits this long for other workers' pending counts (published each loop iteration)
# Publishing is batched: the first count after a quiet spell is published at the end of its loop
# iteration; while busy, at most once per FLUSH_INTERVAL_S (well inside METRICS_SETTLE_S), so a
# request does not pay for a publish of its own at low concurrency either.
FLUSH_INTERVAL_S = 0.01
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class GatewayMetrics:
    """The gateway's own series; create once per process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        self.registry = reg
        self.requests = Counter(
            "pythia_requests", "Requests answered, by pool, replica and HTTP status", ["pool", "replica", "status"], registry=reg
        )
        self.ttft = Histogram(
            "pythia_ttft_seconds", "Time to first byte of the upstream response, as seen by the gateway", ["pool"],
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.e2e = Histogram(
            "pythia_e2e_seconds", "Request arrival to last byte sent, as seen by the gateway", ["pool"],
            buckets=LATENCY_BUCKETS, registry=reg,
        )
        self.inflight = Gauge(
            "pythia_inflight_requests", "Requests being proxied now", ["pool", "replica"],
            multiprocess_mode="livesum", registry=reg,
        )
        self.retries = Counter("pythia_retries", "Calls retried on another replica", ["pool", "reason"], registry=reg)
        self.upstream_errors = Counter(
            "pythia_upstream_errors", "Upstream failures by replica and kind", ["replica", "kind"], registry=reg
        )
        self.replica_healthy = Gauge(
            "pythia_replica_healthy", "1 when the replica passes health checks (min over workers)", ["pool", "replica"],
            multiprocess_mode="livemin", registry=reg,
        )
        self.prefix_index_share = Gauge(
            "pythia_prefix_index_share_ratio",
            "A replica's share of the gateway's prefix index over the share sized from its KV capacity "
            "(1 until hit-rate reconciliation corrects it; max over workers)",
            ["replica"], multiprocess_mode="livemax", registry=reg,
        )  # fmt: skip
        self.predictor_stats = Gauge(
            "pythia_predictor_stat", "Predictor counters (predictor.stats()), summed over workers", ["name"],
            multiprocess_mode="livesum", registry=reg,
        )  # fmt: skip
        self._bounds = (*LATENCY_BUCKETS, float("inf"))
        # pending, not yet published: request counts, histogram bucket counts + sum, in-flight gauges
        self._req: dict[tuple[str, str, int], int] = {}
        self._ttft: dict[str, list[float]] = {}
        self._e2e: dict[str, list[float]] = {}
        self._inflight: dict[str, LocalGauge] = {}
        self._armed = False
        # labelled children, looked up once: `labels()` costs more than the increment it precedes
        self._req_children: dict[tuple[str, str, int], Any] = {}
        self._hist_children: dict[tuple[int, str], Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._next_flush = 0.0  # loop time before which a new batch waits (FLUSH_INTERVAL_S after the last)

    def _arm(self) -> None:
        if not self._armed:
            self._armed = True
            loop = self._loop
            if loop is None or not loop.is_running():  # first use, or a loop that has stopped (tests)
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (scripts, unit tests): publish now
                    self.flush()
                    return
            wait = self._next_flush - loop.time()
            if wait > 0:
                loop.call_later(wait, self.flush)
            else:
                loop.call_soon(self.flush)

    def flush(self) -> None:
        """Publish what the hot path counted since the last flush to the Prometheus values."""
        self._armed = False
        loop = self._loop
        if loop is not None and not loop.is_closed():
            self._next_flush = loop.time() + FLUSH_INTERVAL_S
        if self._req:
            pending, self._req = self._req, {}
            children = self._req_children
            for key, n in pending.items():
                child = children.get(key)
                if child is None:
                    child = children[key] = self.requests.labels(key[0], key[1], str(key[2]))
                child.inc(n)
        for hist, pend in ((self.ttft, self._ttft), (self.e2e, self._e2e)):
            if pend:
                items = list(pend.items())
                pend.clear()
                for pool, counts in items:
                    hkey = (id(hist), pool)
                    child = self._hist_children.get(hkey)
                    if child is None:
                        child = self._hist_children[hkey] = hist.labels(pool)
                    _add_to_histogram(child, counts)
        for g in self._inflight.values():
            if g.value != g.published:
                g.published = g.value
                g.child.set(g.value)

    def request_done(self, pool: str, replica: str, status: int) -> None:
        key = (pool, replica, status)
        self._req[key] = self._req.get(key, 0) + 1
        self._arm()

    def request_finished(self, pool: str, replica: str, status: int, ttft: float, e2e: float) -> None:
        """A proxied call ended: its count, its TTFT (when `ttft` >= 0) and its end-to-end time, in one call."""
        key = (pool, replica, status)
        req = self._req
        req[key] = req.get(key, 0) + 1
        bounds = self._bounds
        if ttft >= 0:
            counts = self._ttft.get(pool)
            if counts is None:
                counts = self._ttft[pool] = [0.0] * (len(bounds) + 1)  # buckets, then the sum
            counts[bisect.bisect_left(bounds, ttft)] += 1
            counts[-1] += ttft
        counts = self._e2e.get(pool)
        if counts is None:
            counts = self._e2e[pool] = [0.0] * (len(bounds) + 1)
        counts[bisect.bisect_left(bounds, e2e)] += 1
        counts[-1] += e2e
        if not self._armed:
            self._arm()

    def _observe(self, pend: dict[str, list[float]], pool: str, seconds: float) -> None:
        counts = pend.get(pool)
        if counts is None:
            counts = pend[pool] = [0.0] * (len(self._bounds) + 1)  # buckets, then the sum
        counts[bisect.bisect_left(self._bounds, seconds)] += 1
        counts[-1] += seconds
        self._arm()

    def observe_ttft(self, pool: str, seconds: float) -> None:
        self._observe(self._ttft, pool, seconds)

    def observe_e2e(self, pool: str, seconds: float) -> None:
        self._observe(self._e2e, pool, seconds)

    def inflight_gauge(self, pool: str, replica: str) -> LocalGauge:
        """The in-flight count of one replica in this process (inc/dec; published at the next flush)."""
        g = self._inflight.get(replica)
        if g is None:
            g = self._inflight[replica] = LocalGauge(self, self.inflight.labels(pool, replica))
        return g

    def retry(self, pool: str, reason: str) -> None:
        self.retries.labels(pool, reason).inc()

    def upstream_error(self, replica: str, kind: str) -> None:
        self.upstream_errors.labels(replica, kind).inc()

    def set_prefix_index_share(self, replica: str, ratio: float) -> None:
        self.prefix_index_share.labels(replica).set(ratio)

    def set_predictor_stats(self, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            self.predictor_stats.labels(name).set(value)

    def set_healthy(self, pool: str, replica: str, healthy: bool) -> None:
        self.replica_healthy.labels(pool, replica).set(1 if healthy else 0)


class LocalGauge:
    """A gauge counted in-process; `GatewayMetrics.flush` publishes its value when it changed."""

    __slots__ = ("child", "metrics", "published", "value")

    def __init__(self, metrics: GatewayMetrics, child: Gauge) -> None:
        self.metrics = metrics
        self.child = child
        self.value = 0
        self.published = 0

    def inc(self) -> None:
        self.value += 1
        if not self.metrics._armed:
            self.metrics._arm()

    def dec(self) -> None:
        self.value -= 1
        if not self.metrics._armed:
            self.metrics._arm()


def _add_to_histogram(child: Histogram, counts: list[float]) -> None:
    """Add pending bucket counts and sum to a histogram child (what `observe` does, for many samples at once)."""
    buckets = child._buckets  # prometheus_client keeps per-bucket (not cumulative) values; observe() adds to one
    for i, n in enumerate(counts[:-1]):
        if n:
            buckets[i].inc(n)
    child._sum.inc(counts[-1])


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def render(own: CollectorRegistry) -> tuple[bytes, str]:
    """The /metrics body: all workers' samples merged in multiprocess mode, else this process's."""
    if multiprocess_enabled():
        reg = CollectorRegistry()
        prom_mp.MultiProcessCollector(reg)
        return generate_latest(reg), CONTENT_TYPE_LATEST
    return generate_latest(own), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (called by the supervisor)."""
    if multiprocess_enabled():
        prom_mp.mark_process_dead(pid)
