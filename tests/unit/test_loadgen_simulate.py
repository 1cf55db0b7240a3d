"""The virtual-time harness: routing core + predictor + simulated engines, and the simulate/compare CLI."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

from loadgen.cli import main
from loadgen.metrics import summarize
from loadgen.simulate import SimConfig, default_pools, parse_pools, simulate
from loadgen.workload import ExpandOptions, generate

SUMMARY_KEYS = ("requests", "errors", "workflows", "mean_jct_s", "p95_jct_s", "mean_ttft_s", "p95_ttft_s",
                "mean_e2e_s", "throughput_rps", "output_tokens_per_s", "prefix_hit_rate", "preemptions")


def test_pool_specs() -> None:
    assert [(p.name, p.replicas, p.max_context_tokens) for p in default_pools(8)] == [("short", 6, 16384), ("long", 2, 131072)]
    assert [(p.name, p.replicas) for p in default_pools(1)] == [("long", 1)]
    pools = parse_pools("a:3:16k,b:1:131072:llama-3.1-8b-h100")
    assert [(p.name, p.replicas, p.max_context_tokens, p.preset) for p in pools] == [
        ("a", 3, 16384, "llama-3.1-8b-a100"), ("b", 1, 131072, "llama-3.1-8b-h100")]
    with pytest.raises(ValueError, match="name:replicas:max_context"):
        parse_pools("a:3")


def test_workflows_complete_in_dependency_order_deterministically() -> None:
    wfs = generate("deep_research", rate=0.5, n=6, seed=3, opts=ExpandOptions(prompt_scale=0.5, output_scale=0.3))
    cfg = SimConfig(policy="pythia", pools=parse_pools("short:2:16384,long:1:131072"))
    a, b = simulate(cfg, wfs), simulate(cfg, wfs)
    sa = summarize(a.requests, a.workflows, engine=a.engine)
    assert sa == summarize(b.requests, b.workflows, engine=b.engine)
    assert sa["workflows_completed"] == 6 and sa["errors"] == 0
    assert sa["requests"] == sum(len(w.calls) for w in wfs)
    by_call = {(r.workflow_id, r.index): r for r in a.requests}
    for wf in wfs:
        for c in wf.calls:
            r = by_call[(wf.workflow_id, c.index)]
            assert r.output_tokens == c.output_tokens  # max_tokens + ignore_eos honoured
            for d in c.depends_on:
                assert r.scheduled_s == pytest.approx(max(by_call[(wf.workflow_id, x)].end_s for x in c.depends_on)
                                                      + c.think_time_s)
                assert r.scheduled_s >= by_call[(wf.workflow_id, d)].end_s
    assert a.stats.per_pool_calls.get("short", 0) > 0


def test_saturated_pool_queues_at_the_gateway_and_oversized_calls_fail() -> None:
    wfs = generate("coding_agent", rate=5, n=12, seed=1, opts=ExpandOptions(think_scale=0.0, prompt_scale=0.3))
    cfg = SimConfig(policy="pythia", pools=parse_pools("short:2:16384"), engine_overrides={"kv_cache_gb": 1.0})
    res = simulate(cfg, wfs)
    s = summarize(res.requests, res.workflows, engine=res.engine)
    assert res.stats.queued > 0  # Decision.queue honoured: the calls waited, then ran
    assert set(s["errors_by_kind"]) <= {"http_400"}  # only calls larger than the whole KV cache fail
    assert s["workflows_completed"] + s["workflows_failed"] == 12 and s["workflows_completed"] > 0
    assert max(r.queued_s for r in res.requests) > 0


def test_a_call_queued_past_the_admission_timeout_goes_to_the_engine_queue() -> None:
    # as the live gateway (PYTHIA_ADMISSION_TIMEOUT_S): after the timeout a queued call is placed
    # without the room filters and waits in vLLM's own queue; it is never failed for waiting
    wfs = generate("coding_agent", rate=5, n=12, seed=1, opts=ExpandOptions(think_scale=0.0, prompt_scale=0.3))
    pools = parse_pools("short:2:16384")
    patient = simulate(SimConfig(policy="pythia", pools=pools, engine_overrides={"kv_cache_gb": 1.0},
                                 admission_timeout_s=math.inf), wfs)
    longest = max(r.queued_s for r in patient.requests)
    assert patient.stats.overflowed == 0 and longest > 2.0
    timeout = longest / 4
    res = simulate(SimConfig(policy="pythia", pools=pools, engine_overrides={"kv_cache_gb": 1.0},
                             admission_timeout_s=timeout), wfs)
    s = summarize(res.requests, res.workflows, engine=res.engine)
    assert res.stats.overflowed > 0
    assert max(r.queued_s for r in res.requests) <= timeout + 1e-6
    assert set(s["errors_by_kind"]) <= {"http_400"}  # as before: only calls larger than the whole KV cache
    assert s["workflows_completed"] + s["workflows_failed"] == 12 and s["workflows_completed"] > 0


def test_compare_cli_writes_result_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    rc = main(["compare", "--policies", "round_robin,least_loaded", "--workload", "chat", "--workflows", "8",
               "--rate", "1", "--replicas", "2", "--think-scale", "0.2", "--out", str(out), "--plot", str(png),
               "--no-progress"])
    assert rc == 0
    doc = orjson.loads(out.read_bytes())
    assert doc["config"]["mode"] == "compare" and doc["config"]["policies"] == ["round_robin", "least_loaded"]
    assert list(doc["results"]) == ["round_robin", "least_loaded"]
    for entry in doc["results"].values():
        assert all(k in entry["summary"] for k in SUMMARY_KEYS)
        assert entry["summary"]["workflows"] == 8 and entry["summary"]["errors"] == 0
    assert png.stat().st_size > 10_000
    assert "vs round_robin" in capsys.readouterr().out
    assert main(["report", str(out), "--plot", str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").exists()


def test_simulate_load_calibrates_and_replays_traces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    trace = tmp_path / "t.jsonl"
    trace.write_bytes(b"\n".join(orjson.dumps({"timestamp": 200 * i, "input_length": 700 + 10 * i, "output_length": 20,
                                                "hash_ids": [0, i]}) for i in range(30)))
    out = tmp_path / "sim.json"
    rc = main(["simulate", "--trace", str(trace), "--policy", "prefix", "--replicas", "2", "--load", "0.5",
               "--calibration-workflows", "30", "--out", str(out), "--no-progress"])
    assert rc == 0
    doc = orjson.loads(out.read_bytes())
    cap = doc["config"]["capacity"]
    assert cap["workflows_per_s"] > 0 and not cap["cached"]
    s = doc["results"]["prefix"]["summary"]
    assert s["requests"] == 30 and s["errors"] == 0 and s["prefix_hit_rate"] > 0
    assert doc["results"]["prefix"]["rate_workflows_per_s"] == pytest.approx(0.5 * cap["workflows_per_s"])
    # the second run reuses the calibration
    assert main(["simulate", "--trace", str(trace), "--policy", "prefix", "--replicas", "2", "--load", "0.5",
                 "--calibration-workflows", "30", "--out", str(out), "--no-progress"]) == 0
    assert orjson.loads(out.read_bytes())["config"]["capacity"]["cached"]


def test_cli_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n{oops\n')
    assert main(["simulate", "--trace", str(bad), "--no-progress"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert main(["simulate", "--workload", "chat", "--rate", "1", "--workflows", "2", "--policy", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err


def test_capacity_is_set_by_the_bottleneck_pool(tmp_path: Path) -> None:
    from loadgen.calibrate import measure_capacity
    from loadgen.simulate import PoolSpec
    from loadgen.workload import expand_workload

    mix = tmp_path / "mix.yaml"
    mix.write_text("name: mix\napp: mix\nmix:\n  chat: 0.7\n  doc_qa: 0.3\n")
    cfg = SimConfig(pools=[PoolSpec("short", 3, 16384), PoolSpec("long", 1, 131072)])
    opts = ExpandOptions(output_scale=0.3)
    cap = measure_capacity(lambda k: expand_workload(str(mix), k, 1, opts), cfg, 60)
    # one long replica for the documents, three short ones for the chats: the long pool limits the cluster
    assert cap.bottleneck == "long"
    assert cap.per_pool_workflows_per_s["short"] > cap.per_pool_workflows_per_s["long"]
    assert cap.workflows_per_s == cap.per_pool_workflows_per_s["long"]
