"""Scrape vLLM counters from replicas' /metrics before and after a run; the deltas give prefix-cache
hit rate and preemptions as the engines themselves count them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from loadgen.metrics import EngineCounters

# sample names (with and without the _total suffix, and vLLM V0's gpu_ names)
QUERIES = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries_total")
HITS = ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits_total")
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")


@dataclass(slots=True)
class CounterSnapshot:
    """Summed counters of every endpoint that answered, and which ones did."""

    queries: float = 0.0
    hits: float = 0.0
    preemptions: float = 0.0
    seen_prefix: bool = False
    seen_preemptions: bool = False
    endpoints: tuple[str, ...] = ()


def parse_counters(text: str) -> CounterSnapshot:
    """Sum the vLLM prefix-cache and preemption counters in one Prometheus exposition."""
    snap = CounterSnapshot()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in QUERIES:
                snap.queries += s.value
                snap.seen_prefix = True
            elif s.name in HITS:
                snap.hits += s.value
                snap.seen_prefix = True
            elif s.name in PREEMPTIONS:
                snap.preemptions += s.value
                snap.seen_preemptions = True
    return snap


def metrics_url(base: str) -> str:
    b = base.rstrip("/")
    if b.endswith("/metrics"):
        return b
    if b.endswith("/v1"):
        b = b[:-3]
    return f"{b}/metrics"


async def scrape(urls: Sequence[str], timeout_s: float = 5.0) -> CounterSnapshot:
    """Sum the counters over every URL that answers with vLLM metrics (others are ignored)."""
    total = CounterSnapshot()
    if not urls:
        return total
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:

        async def one(u: str) -> tuple[str, CounterSnapshot | None]:
            try:
                async with s.get(metrics_url(u)) as r:
                    if r.status != 200:
                        return u, None
                    return u, parse_counters(await r.text())
            except (aiohttp.ClientError, TimeoutError, ValueError):
                return u, None

        seen: list[str] = []
        for u, snap in await asyncio.gather(*(one(u) for u in dict.fromkeys(urls))):
            if snap is None or not (snap.seen_prefix or snap.seen_preemptions):
                continue
            seen.append(u)
            total.queries += snap.queries
            total.hits += snap.hits
            total.preemptions += snap.preemptions
            total.seen_prefix |= snap.seen_prefix
            total.seen_preemptions |= snap.seen_preemptions
    total.endpoints = tuple(seen)
    return total


def counters_delta(before: CounterSnapshot, after: CounterSnapshot) -> EngineCounters:
    """Run deltas of the endpoints seen both times (None where no endpoint reported the counter)."""
    if not after.endpoints or set(before.endpoints) != set(after.endpoints):
        # an endpoint appeared or vanished mid-run: deltas would mix counters, so report nothing
        return EngineCounters()
    return EngineCounters(
        prefix_queries=after.queries - before.queries if after.seen_prefix else None,
        prefix_hits=after.hits - before.hits if after.seen_prefix else None,
        preemptions=after.preemptions - before.preemptions if after.seen_preemptions else None,
        source="metrics",
    )


async def discover_replicas(target: str, api_key: str = "", timeout_s: float = 3.0) -> list[str]:
    """Replica URLs behind a Pythia gateway (GET /pythia/replicas, with `api_key` if set); [] for any other server."""
    base = target.rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s, \
                s.get(f"{base}/pythia/replicas", headers=headers) as r:
            if r.status != 200:
                return []
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return []
    urls: list[str] = []
    for pool in body.get("pools", []) if isinstance(body, dict) else []:
        for rep in pool.get("replicas", []) if isinstance(pool, dict) else []:
            if isinstance(rep, dict) and isinstance(rep.get("url"), str):
                urls.append(rep["url"])
    return urls
