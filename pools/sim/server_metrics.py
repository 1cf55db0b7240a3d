"""Prometheus exposition of an engine's metrics under vLLM's names (read on scrape, no double counting)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pools.sim.engine import SimEngine
from pools.sim.engine_metrics import Histogram


class EngineCollector(Collector):
    """Reads the engine's live numbers each time /metrics is scraped."""

    def __init__(self, engine: SimEngine, preset_name: str) -> None:
        self.engine = engine
        self.preset_name = preset_name

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        m = e.metrics
        model = e.model_name
        lab = ["model_name"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=lab)
            g.add_metric([model], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=lab)
            c.add_metric([model], value)
            return c

        def hist(name: str, doc: str, h: Histogram) -> HistogramMetricFamily:
            f = HistogramMetricFamily(name, doc, labels=lab)
            f.add_metric([model], h.cumulative(), h.sum)
            return f

        yield gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches.", e.num_running
        )
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", e.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", e.kv_usage)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            m.prefix_cache_hits,
        )
        yield counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", m.num_preemptions
        )
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens)
        ok = CounterMetricFamily(
            "vllm:request_success",
            "Count of successfully processed requests.",
            labels=[*lab, "finished_reason"],
        )
        for reason, n in m.success.items():
            ok.add_metric([model, reason], n)
        yield ok
        yield hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", m.ttft)
        yield hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", m.e2e)
        yield hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", m.itl)
        cache = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[
                "block_size",
                "num_gpu_blocks",
                "enable_prefix_caching",
                "cache_dtype",
                "gpu_memory_utilization",
            ],
        )
        cache.add_metric(
            [
                str(e.block_size),
                str(e.num_gpu_blocks),
                "True",
                "auto",
                str(e.preset.engine.gpu_memory_utilization),
            ],
            1.0,
        )
        yield cache
        info = GaugeMetricFamily(
            "pythia_sim_engine_info",
            "Simulated engine: preset and scheduler limits.",
            labels=[
                *lab,
                "preset",
                "max_num_seqs",
                "max_num_batched_tokens",
                "kv_capacity_tokens",
                "scheduling_policy",
            ],
        )
        info.add_metric(
            [
                model,
                self.preset_name,
                str(e.max_num_seqs),
                str(e.max_num_batched_tokens),
                str(e.kv_capacity_tokens),
                e.config.scheduling_policy,
            ],
            1.0,
        )
        yield info


def make_registry(engine: SimEngine, preset_name: str) -> CollectorRegistry:
    """A registry holding only this engine's metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(engine, preset_name))
    return reg
