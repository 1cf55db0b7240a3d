"""The router's per-workflow memory stays bounded: workflows idle for PYTHIA_WORKFLOW_TTL_S are forgotten."""

from __future__ import annotations

from aiohttp import web

from gateway.prediction import ColdPredictor
from gateway.proxy import Gateway
from gateway.pythia_live import WORKFLOW_TTL_KEY, install_pythia_mechanisms
from gateway.settings import Settings
from gateway.workflow_ttl import WorkflowStateReaper
from pools.request_features import extract_features
from pools.routing import RoutingContext, route
from pools.types import PoolConfig
from predictor.types import Prediction, Tags

POOLS = [PoolConfig("short", 16384, ("m",), ("http://h:1", "http://h:2")), PoolConfig("long", 131072, ("m",), ("http://h:3",))]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def gateway(ttl_s: float = 60.0) -> tuple[Gateway, WorkflowStateReaper, Clock]:
    gw = Gateway(Settings.model_validate({"policy": "pythia", "workflow_ttl_s": ttl_s}), POOLS, ColdPredictor())
    app = web.Application()
    install_pythia_mechanisms(app, gw)  # the wiring `pythia serve` uses
    reaper = app[WORKFLOW_TTL_KEY]
    clock = reaper.clock = Clock()
    return gw, reaper, clock


def call(gw: Gateway, wf: str, now: float, prompt_chars: int = 4000) -> str:
    f = extract_features({"model": "m", "prompt": "x" * prompt_chars, "max_tokens": 100}, False, now)
    d = route(RoutingContext(f, Tags(workflow=wf), Prediction(workflow=wf), now, gw.routing_state), gw.view, gw.policy)
    assert d.error is None and d.replica
    return d.pool


def remembered(gw: Gateway) -> int:
    st = gw.routing_state
    return len(set(st.workflow_pool) | set(st.workflow_replica) | set(st.workflow_started))


def test_state_stays_bounded_over_many_finished_workflows() -> None:
    gw, reaper, clock = gateway(ttl_s=60.0)
    # 5,000 workflows of 3 calls each, 2 s apart: at most a TTL's worth (30 workflows) may be remembered
    most = 0
    for i in range(5000):
        clock.t += 2.0
        for _ in range(3):
            call(gw, f"wf-{i}", clock.t)
        if i % 10 == 0:
            reaper.sweep()
        most = max(most, remembered(gw))
    assert most <= 40
    assert len(reaper.last_call) <= 40
    assert reaper.forgotten >= 4900


def test_an_active_workflow_keeps_its_pool_pin() -> None:
    gw, reaper, clock = gateway(ttl_s=60.0)
    assert call(gw, "long-lived", clock.t) == "short"
    for _ in range(20):  # a call every 30 s for 10 minutes: never idle for the TTL
        clock.t += 30.0
        call(gw, "long-lived", clock.t)
        reaper.sweep()
    assert gw.routing_state.workflow_pool["long-lived"] == "short"
    assert gw.routing_state.workflow_started["long-lived"] == 1000.0  # still aging from its first call
    clock.t += 61.0
    assert reaper.sweep() == 1
    assert remembered(gw) == 0


def test_a_workflow_pinned_but_never_placed_is_forgotten_too() -> None:
    gw, reaper, clock = gateway(ttl_s=60.0)
    gw.routing_state.remember_workflow("refused", "long", clock.t)  # e.g. its only call timed out in the queue
    assert reaper.sweep() == 0  # first noticed now
    clock.t += 59.0
    assert reaper.sweep() == 0
    clock.t += 2.0
    assert reaper.sweep() == 1
    assert remembered(gw) == 0
