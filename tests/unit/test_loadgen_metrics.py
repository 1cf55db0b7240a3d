"""Summaries computed from known request and workflow records."""

from __future__ import annotations

import pytest

from loadgen.metrics import EngineCounters, RequestRecord, Slo, WorkflowRecord, dist_stats, summarize
from loadgen.report import table
from loadgen.scrape import CounterSnapshot, counters_delta, parse_counters

REQUIRED = ("requests", "errors", "workflows", "mean_jct_s", "p95_jct_s", "mean_ttft_s", "p95_ttft_s", "mean_e2e_s",
            "throughput_rps", "output_tokens_per_s", "prefix_hit_rate", "preemptions")


def req(i: int, sched: float, ttft: float, e2e: float, out: int = 11, ok: bool = True, error: str = "") -> RequestRecord:
    return RequestRecord(f"w{i}", "app", "r", 0, scheduled_s=sched, sent_s=sched, first_token_s=sched + ttft,
                         end_s=sched + e2e, ok=ok, error=error, prompt_tokens=100, output_tokens=out, cached_tokens=25,
                         itl_s=[0.01] * (out - 1))


def test_summary_on_known_inputs() -> None:
    reqs = [req(i, float(i), ttft=0.1 * (i + 1), e2e=1.0 + i) for i in range(4)]
    reqs.append(req(9, 4.0, 0, 0, ok=False, error="http_503"))
    wfs = [WorkflowRecord(f"w{i}", "app", float(i), end_s=float(i) + 2.0 * (i + 1), calls=1, done=True) for i in range(4)]
    s = summarize(reqs, wfs, Slo(ttft_s=0.25, tpot_s=None), EngineCounters(1000, 400, 3, "metrics"), duration_s=10.0)
    for k in REQUIRED:
        assert k in s
    assert (s["requests"], s["errors"], s["errors_by_kind"]) == (5, 1, {"http_503": 1})
    assert s["workflows"] == 4 and s["workflows_completed"] == 4
    assert s["mean_jct_s"] == pytest.approx(5.0)  # JCTs 2, 4, 6, 8
    assert s["mean_ttft_s"] == pytest.approx(0.25)  # 0.1 .. 0.4 from the scheduled time
    assert s["mean_e2e_s"] == pytest.approx(2.5)
    assert s["throughput_rps"] == pytest.approx(0.4)
    assert s["output_tokens_per_s"] == pytest.approx(4.4)
    assert s["goodput_rps"] == pytest.approx(0.2)  # TTFTs 0.1 and 0.2 meet the 0.25 s SLO
    assert s["prefix_hit_rate"] == pytest.approx(0.4) and s["prefix_hit_rate_source"] == "metrics"
    assert s["preemptions"] == 3
    assert s["cached_tokens_fraction"] == pytest.approx(0.25)
    assert s["itl_s"]["p50"] == pytest.approx(0.01)
    assert s["mean_tpot_s"] is not None
    assert "JCT mean" in table({"target": {"summary": s}})


def test_hit_rate_falls_back_to_usage_and_empty_runs_do_not_crash() -> None:
    s = summarize([req(0, 0.0, 0.1, 1.0)], [], Slo(), None, duration_s=1.0)
    assert s["prefix_hit_rate"] == pytest.approx(0.25) and s["prefix_hit_rate_source"] == "usage"
    empty = summarize([], [], Slo(), None)
    assert empty["requests"] == 0 and empty["mean_jct_s"] is None and empty["throughput_rps"] == 0


def test_dist_stats() -> None:
    d = dist_stats(list(range(101)))
    assert (d["mean"], d["p50"], d["p90"], d["p99"], d["max"]) == (50.0, 50.0, 90.0, 99.0, 100.0)


def test_vllm_counters_and_deltas() -> None:
    text = (
        '# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{model_name="m"} 1000.0\n'
        '# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{model_name="m"} 250.0\n'
        '# TYPE vllm:num_preemptions counter\nvllm:num_preemptions_total{model_name="m"} 2.0\n'
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3.0\n"
    )
    snap = parse_counters(text)
    assert (snap.queries, snap.hits, snap.preemptions) == (1000.0, 250.0, 2.0)
    before = CounterSnapshot(100, 50, 1, True, True, ("a",))
    after = CounterSnapshot(300, 150, 4, True, True, ("a",))
    d = counters_delta(before, after)
    assert (d.prefix_queries, d.prefix_hits, d.preemptions, d.source) == (200, 100, 3, "metrics")
    assert counters_delta(before, CounterSnapshot(300, 150, 4, True, True, ("a", "b"))).prefix_queries is None
