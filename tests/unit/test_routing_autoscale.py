"""Desired replicas: predictive from in-flight workflows, reactive from utilisation; cold starts."""

from __future__ import annotations

from pools.autoscale import (
    Autoscaler,
    PredictiveConfig,
    ReplicaCapacity,
    WorkflowLoad,
    predictive_desired_replicas,
    reactive_desired_replicas,
)
from predictor.types import Prediction

CAP = {"short": ReplicaCapacity(output_tokens_per_s=1000.0, prefill_tokens_per_s=10_000.0, kv_capacity_tokens=200_000)}


def test_predictive_scales_with_the_work_in_flight_workflows_still_have() -> None:
    cfg = PredictiveConfig(horizon_s=100.0, step_s=5.0, target_utilization=0.5)
    few = [WorkflowLoad("short", 10, 5_000.0)] * 10  # 50k output tokens in 100 s = 500 tok/s
    many = [WorkflowLoad("short", 10, 5_000.0)] * 40
    assert predictive_desired_replicas(few, CAP, cfg=cfg) == {"short": 1}
    assert predictive_desired_replicas(many, CAP, cfg=cfg) == {"short": 4}
    # workflows about to finish add nothing
    assert predictive_desired_replicas([WorkflowLoad("short", 0, 0.0)] * 100, CAP, cfg=cfg) == {"short": 1}
    # expected arrivals add their mean work before they arrive
    mean = {"short": WorkflowLoad("short", 10, 5_000.0)}
    assert predictive_desired_replicas(few, CAP, {"short": 1.0}, mean, cfg=cfg)["short"] == 11


def test_projection_from_a_prediction() -> None:
    p = Prediction(cold=False, remaining_steps=4.0, remaining_output_tokens=800.0, peak_context_tokens=9000)
    w = WorkflowLoad.from_prediction("short", p, prompt_tokens=3000, new_tokens_per_step=500.0)
    assert (w.remaining_steps, w.remaining_output_tokens, w.remaining_prefill_tokens, w.context_tokens) == (
        4.0, 800.0, 2000.0, 9000.0)


def test_reactive_follows_hpa_rule() -> None:
    assert reactive_desired_replicas(4, 0.7) == 4
    assert reactive_desired_replicas(4, 0.74) == 4  # inside the 10% tolerance
    assert reactive_desired_replicas(4, 1.0) == 6
    assert reactive_desired_replicas(4, 0.2) == 2


def test_autoscaler_applies_cold_start_and_scale_down_delay() -> None:
    a = Autoscaler(cold_start_s=60.0, scale_down_delay_s=30.0, ready={"short": 2})
    ev = a.step(0.0, {"short": 4})
    assert [(e.delta, e.ready_s) for e in ev] == [(1, 60.0), (1, 60.0)]
    assert a.step(10.0, {"short": 4}) == []  # already coming
    assert a.advance(59.0) == [] and a.ready["short"] == 2
    assert len(a.advance(60.0)) == 2 and a.ready["short"] == 4
    assert a.step(100.0, {"short": 1}) == []  # below, but not for long enough
    down = a.step(131.0, {"short": 1})
    assert [e.delta for e in down] == [-1, -1, -1] and a.ready["short"] == 1
