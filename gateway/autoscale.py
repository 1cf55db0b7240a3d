"""The predictive autoscaling signal, live (Pythia mechanism 6): `GET /pythia/autoscale` and
the Prometheus gauge `pythia_pool_desired_replicas{pool}`.

Every placed call updates its workflow's projection (`pools.autoscale.WorkflowLoad` from the
call's `Prediction`); workflows not seen for `workflow_ttl_s` are forgotten. Every
`autoscale_interval_s` the in-flight workflows, the rate of new ones and a mean new workflow go
through `pools.autoscale.predictive_replica_demand`.

Semantics across processes: each gateway worker (and each gateway pod) only sees its own share of
the traffic, so the gauge carries that share *unrounded and without a floor of 1*; the worker
gauges are summed within a pod (multiprocess `livesum`) and the KEDA / prometheus-adapter queries
in deploy/k8s take `sum(...)` over pods; the autoscaler rounds up and applies its own minimum.
The JSON endpoint shows this worker's view: its share, the rounded predictive and the reactive
(HPA rule on scraped utilisation) desired replicas, and the projected load.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import Gauge

from gateway.proxy import Gateway
from gateway.tasks import cancel_and_wait
from pools.autoscale import (
    PredictiveConfig,
    ReplicaCapacity,
    WorkflowLoad,
    pool_utilization,
    predictive_replica_demand,
    reactive_desired_replicas,
)
from pools.routing import RoutingContext
from pools.types import ReplicaState

log = logging.getLogger("pythia.autoscale")

ARRIVAL_WINDOW_S = 60.0  # new workflows are counted over this window for the arrival rate
MEAN_EWMA = 0.1  # weight of one new workflow in the pool's mean workflow
BATCH_REF = 32  # running sequences counted as a fully busy replica in the reactive rule (as pools.autoscale_bench)
MAX_TRACKED = 100_000  # workflows remembered per worker at most (oldest forgotten first)


@dataclass(slots=True)
class _Flow:
    """One tracked workflow: what its latest call predicted, kept as plain numbers and updated in place.

    `observe_call` runs on every placed call: it stores the few inputs of
    `WorkflowLoad.from_prediction` instead of building that frozen dataclass per call; `load` builds it
    when `refresh` (periodic) asks, with the same arguments, so the projection is the same."""

    pool: str
    remaining_steps: float  # the prediction's, as it was at the call
    remaining_output_tokens: float
    peak_context_tokens: int
    prompt_tokens: int
    growth: int  # prompt tokens added since the workflow's previous call
    seen: float

    @property
    def load(self) -> WorkflowLoad:
        """`WorkflowLoad.from_prediction` of the latest call."""
        return WorkflowLoad(
            self.pool,
            max(0.0, self.remaining_steps),
            max(0.0, self.remaining_output_tokens),
            max(0.0, self.remaining_steps) * float(self.growth),
            float(max(self.peak_context_tokens, self.prompt_tokens)),
        )


class AutoscaleSignal:
    """Tracks in-flight workflows from placed calls and turns them into desired replicas per pool."""

    def __init__(self, gw: Gateway) -> None:
        s = gw.settings
        self.gw = gw
        self.interval_s = s.autoscale_interval_s
        self.cfg = PredictiveConfig(
            horizon_s=s.autoscale_horizon_s, step_s=s.autoscale_step_s,
            target_utilization=s.autoscale_target_utilization,
        )  # fmt: skip
        self.output_tps = s.autoscale_output_tokens_per_s
        self.prefill_tps = s.autoscale_prefill_tokens_per_s
        # a workflow silent for longer than its projected life plus a step is over
        self.workflow_ttl_s = max(s.autoscale_horizon_s, 4 * s.autoscale_step_s)
        self.flows: dict[str, _Flow] = {}
        self.arrivals: dict[str, deque[float]] = {}
        self.mean: dict[str, WorkflowLoad] = {}
        self.last: dict[str, Any] = {"pools": []}
        self._task: asyncio.Task[None] | None = None
        self.gauge = Gauge(
            "pythia_pool_desired_replicas",
            "Replicas each pool needs for the load this gateway's in-flight and arriving workflows bring next "
            "(unrounded share, no floor; sum over workers and gateway pods, then round up)",
            ["pool"], multiprocess_mode="livesum", registry=gw.metrics.registry,
        )  # fmt: skip

    def install(self) -> None:
        """Watch every placed call (an after-pick hook on the gateway's policy)."""
        policy = self.gw.policy
        policy.after_pick = (*policy.after_pick, self.observe_call)

    async def start(self) -> None:
        self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="pythia-autoscale")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    # -- per call (sync, on the request's path: dict updates only) ---------------------------------
    def observe_call(self, ctx: RoutingContext, chosen: ReplicaState) -> None:
        """After-pick hook: project this call's workflow along its prediction."""
        p = ctx.prediction
        wf = p.workflow or ctx.tags.workflow  # workflow_id(ctx), inline: every call asks
        if not wf:
            return
        now = time.monotonic()
        prompt = ctx.features.prompt_tokens
        old = self.flows.get(wf)
        if old is not None:
            # a later call: update in place (the workflow keeps its place in the oldest-first order)
            grown = prompt - old.prompt_tokens  # new prompt tokens per step: growth since its last call
            old.pool = chosen.pool
            old.remaining_steps = p.remaining_steps
            old.remaining_output_tokens = p.remaining_output_tokens
            old.peak_context_tokens = p.peak_context_tokens
            old.prompt_tokens = prompt
            old.growth = grown if grown > 0 else 0
            old.seen = now
            return
        flow = self.flows[wf] = _Flow(
            chosen.pool, p.remaining_steps, p.remaining_output_tokens, p.peak_context_tokens, prompt, 0, now
        )
        self._arrived(chosen.pool, flow.load, now, p.cold)
        if len(self.flows) > MAX_TRACKED:
            for k in list(self.flows)[: len(self.flows) - MAX_TRACKED]:
                del self.flows[k]

    def _arrived(self, pool: str, load: WorkflowLoad, now: float, cold: bool) -> None:
        self.arrivals.setdefault(pool, deque()).append(now)
        if cold:  # a cold prediction knows nothing of the rest of the workflow
            return
        m = self.mean.get(pool)
        if m is None:
            self.mean[pool] = load
            return
        a = MEAN_EWMA
        self.mean[pool] = WorkflowLoad(
            pool,
            m.remaining_steps + a * (load.remaining_steps - m.remaining_steps),
            m.remaining_output_tokens + a * (load.remaining_output_tokens - m.remaining_output_tokens),
            m.remaining_prefill_tokens + a * (load.remaining_prefill_tokens - m.remaining_prefill_tokens),
            m.context_tokens + a * (load.context_tokens - m.context_tokens),
        )

    # -- periodic ----------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.refresh()
            except Exception:
                log.exception("autoscale signal failed")

    def refresh(self, now: float | None = None) -> dict[str, Any]:
        """Recompute the signal, set the gauge, and return (and keep) the JSON view."""
        now = time.monotonic() if now is None else now
        for wf in [k for k, v in self.flows.items() if now - v.seen > self.workflow_ttl_s]:
            del self.flows[wf]
        rates: dict[str, float] = {}
        for pool, dq in self.arrivals.items():
            while dq and dq[0] < now - ARRIVAL_WINDOW_S:
                dq.popleft()
            rates[pool] = len(dq) / ARRIVAL_WINDOW_S
        capacity: dict[str, ReplicaCapacity] = {}
        for p in self.gw.view.pools:
            caps = [r.kv_capacity_tokens for r in p.replicas if r.kv_capacity_tokens > 0]
            capacity[p.name] = ReplicaCapacity(self.output_tps, self.prefill_tps, min(caps) if caps else 0)
        loads = [f.load for f in self.flows.values()]  # built once here, not on every call
        demand = predictive_replica_demand(loads, capacity, rates, self.mean, self.cfg)
        pools_out = []
        for p in self.gw.view.pools:
            share = demand.get(p.name, 0.0)
            self.gauge.labels(p.name).set(share)
            ready = [r for r in p.replicas if r.healthy]
            util = pool_utilization([r.kv_usage for r in ready], [min(1.0, r.num_running / BATCH_REF) for r in ready])
            mine = [w for w in loads if w.pool == p.name]
            active = [w for w in mine if w.remaining_steps > 0]
            pools_out.append({
                "pool": p.name,
                "current_replicas": len(ready),
                "configured_replicas": len(p.replicas),
                "desired_replicas_share": round(share, 4),
                "desired_replicas_predictive": min(self.cfg.max_replicas, max(self.cfg.min_replicas, math.ceil(share - 1e-9))),
                "desired_replicas_reactive": reactive_desired_replicas(len(ready), util),
                "utilization": round(util, 4),
                "projected": {
                    "inflight_workflows": len(active),
                    "tracked_workflows": len(mine),
                    "new_workflows_per_s": round(rates.get(p.name, 0.0), 4),
                    "remaining_steps": round(sum(w.remaining_steps for w in mine), 2),
                    "remaining_output_tokens": round(sum(w.remaining_output_tokens for w in mine), 1),
                    "remaining_prefill_tokens": round(sum(w.remaining_prefill_tokens for w in mine), 1),
                    "resident_context_tokens": round(sum(w.context_tokens for w in active), 1),
                },
            })  # fmt: skip
        self.last = {
            "pid": os.getpid(),
            "at_monotonic_s": round(now, 3),
            "horizon_s": self.cfg.horizon_s,
            "semantics": "per-worker share; sum desired_replicas_share over workers and gateway pods, then round up",
            "pools": pools_out,
        }
        return self.last

    async def handle(self, request: web.Request) -> web.Response:
        """GET /pythia/autoscale: this worker's signal, recomputed now."""
        return web.Response(body=orjson.dumps(self.refresh()), content_type="application/json")
