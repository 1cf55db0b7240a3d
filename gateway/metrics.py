"""Prometheus metrics of the gateway, correct across worker processes.

`pythia serve` sets PROMETHEUS_MULTIPROC_DIR before any worker imports prometheus_client,
so every worker writes its samples to mmap files and `/metrics` (served by any worker)
merges them all. Label children are cached: an observation costs a dict lookup and an
mmap write, no allocation.
"""

from __future__ import annotations

import os

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
        self.predictor_stats = Gauge(
            "pythia_predictor_stat", "Predictor counters (predictor.stats()), summed over workers", ["name"],
            multiprocess_mode="livesum", registry=reg,
        )  # fmt: skip
        self._req: dict[tuple[str, str, int], Counter] = {}
        self._ttft: dict[str, Histogram] = {}
        self._e2e: dict[str, Histogram] = {}
        self._inflight: dict[str, Gauge] = {}

    def request_done(self, pool: str, replica: str, status: int) -> None:
        key = (pool, replica, status)
        c = self._req.get(key)
        if c is None:
            c = self._req[key] = self.requests.labels(pool, replica, str(status))
        c.inc()

    def observe_ttft(self, pool: str, seconds: float) -> None:
        h = self._ttft.get(pool)
        if h is None:
            h = self._ttft[pool] = self.ttft.labels(pool)
        h.observe(seconds)

    def observe_e2e(self, pool: str, seconds: float) -> None:
        h = self._e2e.get(pool)
        if h is None:
            h = self._e2e[pool] = self.e2e.labels(pool)
        h.observe(seconds)

    def inflight_gauge(self, pool: str, replica: str) -> Gauge:
        g = self._inflight.get(replica)
        if g is None:
            g = self._inflight[replica] = self.inflight.labels(pool, replica)
        return g

    def retry(self, pool: str, reason: str) -> None:
        self.retries.labels(pool, reason).inc()

    def upstream_error(self, replica: str, kind: str) -> None:
        self.upstream_errors.labels(replica, kind).inc()

    def set_predictor_stats(self, stats: dict[str, float]) -> None:
        for name, value in stats.items():
            self.predictor_stats.labels(name).set(value)

    def set_healthy(self, pool: str, replica: str, healthy: bool) -> None:
        self.replica_healthy.labels(pool, replica).set(1 if healthy else 0)


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
