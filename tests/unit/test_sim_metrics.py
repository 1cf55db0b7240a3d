"""Every vLLM metric the gateway scrapes is exported, with vLLM's names and labels, and moves."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pools.sim import SimEngine, SimRequest
from pools.sim.server_metrics import make_registry

NAMES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_count",
    "vllm:e2e_request_latency_seconds_count",
]


def scrape(eng: SimEngine) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(generate_latest(make_registry(eng, "p")).decode()):
        for s in fam.samples:
            if s.labels.get("model_name") == eng.model_name or s.name == "vllm:cache_config_info":
                out.setdefault(s.name, 0.0)
                if "le" not in s.labels:
                    out[s.name] += s.value
    return out


def test_exposition_has_vllm_names_and_capacity() -> None:
    eng = SimEngine.from_preset("llama-3.1-8b-a100", kv_cache_gb=2.0)
    text = generate_latest(make_registry(eng, "llama-3.1-8b-a100")).decode()
    for name in NAMES:
        assert f'{name}{{model_name="llama-3.1-8b"' in text or f"{name}{{" in text, name
    assert f'num_gpu_blocks="{eng.num_gpu_blocks}"' in text and 'block_size="16"' in text
    assert 'vllm:time_to_first_token_seconds_bucket{le="0.001",model_name="llama-3.1-8b"}' in text


def test_metrics_move_as_requests_flow() -> None:
    eng = SimEngine.from_preset("llama-3.1-8b-a100", kv_cache_gb=1.0)
    before = scrape(eng)
    assert all(before[n] == 0 for n in NAMES)
    text = "shared context " * 300
    for i in range(12):
        eng.add_request(SimRequest.from_text(f"r{i}", text + str(i), max_tokens=1200, ignore_eos=True), 0.0)
    eng.advance(0.5)
    mid = scrape(eng)
    assert mid["vllm:num_requests_running"] > 0
    assert mid["vllm:kv_cache_usage_perc"] > 0.1
    assert mid["vllm:prefix_cache_hits_total"] > 0  # later requests reuse the first one's blocks
    t = eng.next_event_time()
    while t is not None:
        eng.advance(t)
        t = eng.next_event_time()
    after = scrape(eng)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:num_requests_waiting"] == 0
    assert after["vllm:kv_cache_usage_perc"] == 0
    assert after["vllm:num_preemptions_total"] > 0  # 12 x 1300 tokens do not fit 8192
    assert after["vllm:generation_tokens_total"] == 12 * 1200
    results = [eng.result(f"r{i}") for i in range(12)]
    assert after["vllm:prompt_tokens_total"] == sum(r.prompt_tokens for r in results if r is not None)
    assert after["vllm:time_to_first_token_seconds_count"] == 12
    assert after["vllm:e2e_request_latency_seconds_count"] == 12
    assert mid["vllm:num_requests_waiting"] + mid["vllm:num_requests_running"] == 12
