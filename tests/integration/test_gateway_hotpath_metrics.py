"""Batched hot-path metrics publish exactly what per-sample prometheus_client calls would have."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import LATENCY_BUCKETS, GatewayMetrics


def _samples(reg: CollectorRegistry, name: str) -> dict[str, float]:
    out = {}
    for family in reg.collect():
        for s in family.samples:
            if s.name.startswith(name):
                out[s.name + str(sorted(s.labels.items()))] = s.value
    return out


async def test_counts_and_histograms_match_unbatched_prometheus_after_one_loop_iteration() -> None:
    m = GatewayMetrics()
    ref_reg = CollectorRegistry()
    ref = Histogram("pythia_e2e_seconds", "ref", ["pool"], buckets=LATENCY_BUCKETS, registry=ref_reg)
    values = [0.0, 0.004, 0.005, 0.0051, 0.3, 2.5, 7.0, 299.0, 301.0, 1e6]
    gauge = m.inflight_gauge("short", "http://a")
    gauge.inc()
    for v in values:
        m.observe_e2e("short", v)
        ref.labels("short").observe(v)
        m.request_done("short", "http://a", 200)
    m.request_done("", "", 404)
    await asyncio.sleep(0)  # the flush runs at the end of this loop iteration
    await asyncio.sleep(0)
    got = _samples(m.registry, "pythia_e2e_seconds")
    want = _samples(ref_reg, "pythia_e2e_seconds")
    assert {k: v for k, v in got.items() if "created" not in k} == {k: v for k, v in want.items() if "created" not in k}
    text = generate_latest(m.registry).decode()
    assert 'pythia_requests_total{pool="short",replica="http://a",status="200"} 10.0' in text
    assert 'pythia_requests_total{pool="",replica="",status="404"} 1.0' in text
    assert 'pythia_inflight_requests{pool="short",replica="http://a"} 1.0' in text
    gauge.dec()
    m.flush()
    assert 'pythia_inflight_requests{pool="short",replica="http://a"} 0.0' in generate_latest(m.registry).decode()


def test_without_a_loop_samples_are_published_at_once() -> None:
    m = GatewayMetrics()
    m.request_done("p", "r", 200)
    m.observe_ttft("p", 0.02)
    text = generate_latest(m.registry).decode()
    assert 'pythia_requests_total{pool="p",replica="r",status="200"} 1.0' in text
    assert 'pythia_ttft_seconds_bucket{le="0.025",pool="p"} 1.0' in text
