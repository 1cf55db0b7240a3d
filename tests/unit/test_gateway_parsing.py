"""Reading what upstreams say: vLLM /metrics text and `usage` in JSON bodies and SSE tails."""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from gateway.features import find_usage
from gateway.proxy import with_field
from gateway.scrape import parse_vllm_metrics

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="1",model_name="llama"} 2.0
vllm:num_requests_waiting{engine="0",model_name="llama"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="llama"} 0.75
vllm:prefix_cache_queries_total{engine="0",model_name="llama"} 1000.0
vllm:prefix_cache_hits_total{engine="0",model_name="llama"} 250.0
vllm:num_preemptions_total{engine="0",model_name="llama"} 7.0
vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",num_gpu_blocks="2048"} 1.0
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="llama"} 5.0
"""


def test_vllm_metrics_are_summed_over_engines() -> None:
    s = parse_vllm_metrics(VLLM_METRICS)
    assert (s.num_running, s.num_waiting, s.kv_usage) == (5.0, 4.0, 0.75)
    assert (s.prefix_cache_queries, s.prefix_cache_hits, s.num_preemptions) == (1000.0, 250.0, 7.0)
    assert s.kv_capacity_tokens == 2048 * 16


def test_missing_metrics_stay_unknown() -> None:
    s = parse_vllm_metrics("# nothing\nother_metric 1\n")
    assert s.num_running is None and s.kv_capacity_tokens is None


def test_usage_from_json_body_and_sse_tail() -> None:
    body = (
        b'{"id":"x","choices":[{"message":{"content":"the word \\"usage\\" in text"}}],'
        b'"usage":{"prompt_tokens":12,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":8}}}'
    )
    assert find_usage(body) == {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 8}}
    sse = (
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\ndata: [DONE]\n\n'
    )
    assert find_usage(sse) == {"prompt_tokens": 5, "completion_tokens": 1}
    assert find_usage(b'data: {"usage":null}\n\n') is None
    assert find_usage(b"data: [DONE]\n\n") is None


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=5)  # what a JSON parser accepts


@given(st.dictionaries(_TEXT.filter(lambda k: k != "priority"), st.integers(-(2**53), 2**53) | _TEXT, max_size=4),
       st.integers(-(2**31), 2**31), st.sampled_from(["", " ", "\n  "]))
def test_priority_added_to_the_client_bytes_parses_as_the_body_with_it(body: dict[str, object], prio: int, ws: str) -> None:
    raw = json.dumps(body).encode() + ws.encode()
    out = with_field(raw, bool(body), b"priority", prio)
    assert orjson.loads(out) == {**body, "priority": prio}
    assert out.startswith(raw.rstrip()[:-1])  # the client's own bytes, untouched, up to the closing brace
