"""The live autoscaling signal: workflows seen by the gateway -> desired replicas per pool, gauge and JSON."""

from __future__ import annotations

from gateway.autoscale import AutoscaleSignal
from gateway.prediction import ColdPredictor
from gateway.proxy import Gateway
from gateway.settings import Settings
from pools.request_features import extract_features
from pools.routing import RoutingContext
from pools.types import PoolConfig
from predictor.types import Prediction, Tags

POOLS = [PoolConfig("short", 16384, ("m",), ("http://h:1", "http://h:2")), PoolConfig("long", 131072, ("m",), ("http://h:3",))]


def signal() -> tuple[Gateway, AutoscaleSignal]:
    s = Settings(policy="pythia", autoscale_output_tokens_per_s=100.0, autoscale_prefill_tokens_per_s=10_000.0)
    gw = Gateway(s, POOLS, ColdPredictor())
    return gw, AutoscaleSignal(gw)


def place(gw: Gateway, sig: AutoscaleSignal, wf: str, pool: str, remaining: float) -> None:
    f = extract_features({"model": "m", "prompt": "x" * 4000, "max_tokens": 100}, False, 0.0)
    p = Prediction(cold=False, workflow=wf, remaining_steps=remaining, remaining_output_tokens=remaining * 500,
                   peak_context_tokens=5000)
    replica = next(r for r in gw.replicas.values() if r.pool == pool)
    sig.observe_call(RoutingContext(f, Tags(workflow=wf), p, 0.0, gw.routing_state), replica)


def share(sig: AutoscaleSignal, pool: str) -> float:
    return float(next(p for p in sig.refresh()["pools"] if p["pool"] == pool)["desired_replicas_share"])


def gauge(gw: Gateway, pool: str) -> float:
    v = gw.metrics.registry.get_sample_value("pythia_pool_desired_replicas", {"pool": pool})
    return float(v or 0.0)


def test_desired_replicas_rise_with_inflight_workflows_in_their_pool() -> None:
    gw, sig = signal()
    assert share(sig, "short") == 0.0 and gauge(gw, "short") == 0.0  # no traffic: a share of 0, no floor of 1
    for i in range(5):
        place(gw, sig, f"w{i}", "short", 6)
    few = share(sig, "short")
    for i in range(5, 40):
        place(gw, sig, f"w{i}", "short", 6)
    many = share(sig, "short")
    assert 0 < few < many
    assert gauge(gw, "short") == many and share(sig, "long") == 0.0
    view = next(p for p in sig.last["pools"] if p["pool"] == "short")
    assert view["projected"]["inflight_workflows"] == 40 and view["current_replicas"] == 2
    assert view["desired_replicas_predictive"] >= 1 and view["desired_replicas_reactive"] >= 1


def test_a_finished_workflow_stops_counting() -> None:
    gw, sig = signal()
    for i in range(10):
        place(gw, sig, f"w{i}", "long", 4)
    busy = share(sig, "long")
    for i in range(10):
        place(gw, sig, f"w{i}", "long", 0)  # the last calls: nothing remains
    assert share(sig, "long") < busy


def test_tracked_workflows_project_exactly_as_from_prediction_of_their_latest_call() -> None:
    """`observe_call` keeps a call's numbers and builds the `WorkflowLoad` only on refresh: the loads, the
    mean new workflow and the signal must be what `WorkflowLoad.from_prediction` per call gives."""
    import random

    from pools.autoscale import WorkflowLoad

    gw, sig = signal()
    rng = random.Random(5)
    expected: dict[str, WorkflowLoad] = {}
    last_prompt: dict[str, int] = {}
    mean: dict[str, WorkflowLoad] = {}
    for _ in range(400):
        wf = f"w{rng.randrange(30)}"
        pool = rng.choice(("short", "long"))
        f = extract_features({"model": "m", "prompt": "x" * rng.randrange(1, 20000), "max_tokens": 100}, False, 0.0)
        p = Prediction(cold=rng.random() < 0.3, workflow=wf, remaining_steps=rng.choice((-1.0, 0.0, 2.5, 7.0)),
                       remaining_output_tokens=rng.uniform(-10, 3000), peak_context_tokens=rng.randrange(0, 30000))
        growth = max(0, f.prompt_tokens - last_prompt[wf]) if wf in last_prompt else 0
        load = WorkflowLoad.from_prediction(pool, p, f.prompt_tokens, float(growth))
        if wf not in last_prompt and not p.cold:
            m = mean.get(pool)
            mean[pool] = load if m is None else WorkflowLoad(
                pool, *(a + 0.1 * (b - a) for a, b in zip(
                    (m.remaining_steps, m.remaining_output_tokens, m.remaining_prefill_tokens, m.context_tokens),
                    (load.remaining_steps, load.remaining_output_tokens, load.remaining_prefill_tokens,
                     load.context_tokens), strict=True)))
        expected[wf], last_prompt[wf] = load, f.prompt_tokens
        replica = next(r for r in gw.replicas.values() if r.pool == pool)
        sig.observe_call(RoutingContext(f, Tags(workflow=wf), p, 0.0, gw.routing_state), replica)
    assert list(sig.flows) == list(expected)  # first-seen order: the oldest are trimmed first
    assert {wf: fl.load for wf, fl in sig.flows.items()} == expected
    assert sig.mean == mean
