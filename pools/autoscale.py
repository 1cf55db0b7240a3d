"""Desired replicas per pool (Pythia mechanism 6), a reactive baseline, and an autoscaler with cold start.

Predictive: every in-flight workflow is projected along the predictor's automaton — its expected
remaining calls, output and prefill tokens (`Prediction.remaining_*`) — to the token rate it will
put on its pinned pool over the next `horizon_s`; workflows expected to start in that window add
their mean work. Desired replicas = that rate over what one replica sustains at a target utilisation
(and enough KV for the contexts that will be resident). Reactive (Kubernetes HPA rule): scale by
observed utilisation / target, with a tolerance band. `Autoscaler` turns either signal into replicas
that become ready only after `cold_start_s`, as a vLLM pod does (image pull, weight load, warm-up).
All pure: time and observations are passed in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from predictor.types import Prediction


@dataclass(slots=True, frozen=True)
class WorkflowLoad:
    """What one in-flight workflow still needs, as predicted at its latest call."""

    pool: str
    remaining_steps: float
    remaining_output_tokens: float
    remaining_prefill_tokens: float = 0.0  # prompt tokens still to prefill (uncached), over the rest
    context_tokens: float = 0.0  # KV the workflow keeps resident while a call of it runs

    @classmethod
    def from_prediction(cls, pool: str, p: Prediction, prompt_tokens: int, new_tokens_per_step: float = 0.0) -> WorkflowLoad:
        """Project from a Prediction: each later step re-reads its context (cached) plus new tokens."""
        steps = max(0.0, p.remaining_steps)
        return cls(
            pool=pool,
            remaining_steps=steps,
            remaining_output_tokens=max(0.0, p.remaining_output_tokens),
            remaining_prefill_tokens=steps * new_tokens_per_step,
            context_tokens=float(max(p.peak_context_tokens, prompt_tokens)),
        )


@dataclass(slots=True, frozen=True)
class ReplicaCapacity:
    """What one replica of a pool sustains (from the engine preset or measured)."""

    output_tokens_per_s: float  # decode throughput at a typical batch
    prefill_tokens_per_s: float
    kv_capacity_tokens: int


@dataclass(slots=True, frozen=True)
class PredictiveConfig:
    """Knobs of the predictive signal."""

    horizon_s: float = 120.0  # look this far ahead (at least the cold start)
    step_s: float = 8.0  # typical time per workflow step (service + tool), spreads work over time
    target_utilization: float = 0.75
    active_fraction: float = 0.6  # share of in-flight workflows with a call running at any time
    min_replicas: int = 1
    max_replicas: int = 64


def predictive_desired_replicas(
    workflows: Iterable[WorkflowLoad],
    capacity: Mapping[str, ReplicaCapacity],
    new_workflow_rate: Mapping[str, float] | None = None,
    mean_workflow: Mapping[str, WorkflowLoad] | None = None,
    cfg: PredictiveConfig = PredictiveConfig(),
) -> dict[str, int]:
    """Replicas each pool needs for the load its in-flight (and expected new) workflows bring next."""
    need = predictive_replica_demand(workflows, capacity, new_workflow_rate, mean_workflow, cfg)
    return {p: min(cfg.max_replicas, max(cfg.min_replicas, math.ceil(n - 1e-9))) for p, n in need.items()}


def predictive_replica_demand(
    workflows: Iterable[WorkflowLoad],
    capacity: Mapping[str, ReplicaCapacity],
    new_workflow_rate: Mapping[str, float] | None = None,
    mean_workflow: Mapping[str, WorkflowLoad] | None = None,
    cfg: PredictiveConfig = PredictiveConfig(),
) -> dict[str, float]:
    """The same need, unrounded and without min/max. Its throughput and KV terms add up over disjoint
    sets of workflows, so each gateway process reports its own traffic's share and the autoscaler sums
    the shares (the max of the two terms per share makes the sum a slight overestimate, never under)."""
    out_rate: dict[str, float] = {p: 0.0 for p in capacity}
    pre_rate: dict[str, float] = {p: 0.0 for p in capacity}
    kv: dict[str, float] = {p: 0.0 for p in capacity}
    for w in workflows:
        if w.pool not in capacity:
            continue
        # the workflow's remaining work is spread over its remaining life, or the horizon if shorter
        span = max(cfg.horizon_s, w.remaining_steps * cfg.step_s, 1e-9)
        within = min(1.0, cfg.horizon_s / span)
        out_rate[w.pool] += w.remaining_output_tokens * within / cfg.horizon_s
        pre_rate[w.pool] += w.remaining_prefill_tokens * within / cfg.horizon_s
        if w.remaining_steps > 0:
            kv[w.pool] += w.context_tokens * cfg.active_fraction
    for pool, rate in (new_workflow_rate or {}).items():
        mean = (mean_workflow or {}).get(pool)
        if pool not in capacity or mean is None or rate <= 0:
            continue
        out_rate[pool] += rate * mean.remaining_output_tokens
        pre_rate[pool] += rate * mean.remaining_prefill_tokens
        life = max(cfg.step_s, mean.remaining_steps * cfg.step_s)
        kv[pool] += rate * min(life, cfg.horizon_s) * mean.context_tokens * cfg.active_fraction
    demand: dict[str, float] = {}
    for pool, cap in capacity.items():
        busy = 0.0
        if cap.output_tokens_per_s > 0:
            busy += out_rate[pool] / cap.output_tokens_per_s
        if cap.prefill_tokens_per_s > 0:
            busy += pre_rate[pool] / cap.prefill_tokens_per_s
        need = busy / cfg.target_utilization
        if cap.kv_capacity_tokens > 0:
            need = max(need, kv[pool] / (cap.kv_capacity_tokens * cfg.target_utilization))
        demand[pool] = need
    return demand


@dataclass(slots=True, frozen=True)
class ReactiveConfig:
    """Kubernetes HPA's rule on one utilisation metric."""

    target_utilization: float = 0.7
    tolerance: float = 0.1  # HPA's default: no change while within 10% of the target
    min_replicas: int = 1
    max_replicas: int = 64


def reactive_desired_replicas(current: int, utilization: float, cfg: ReactiveConfig = ReactiveConfig()) -> int:
    """HPA: ceil(current * utilisation / target), unchanged inside the tolerance band."""
    if current <= 0:
        return cfg.min_replicas
    ratio = utilization / cfg.target_utilization
    if abs(ratio - 1.0) <= cfg.tolerance:
        return max(cfg.min_replicas, min(cfg.max_replicas, current))
    return max(cfg.min_replicas, min(cfg.max_replicas, math.ceil(current * ratio - 1e-9)))


def pool_utilization(kv_usage: Iterable[float], busy: Iterable[float]) -> float:
    """A pool's utilisation for the reactive rule: mean over ready replicas of max(KV used, batch busy)."""
    vals = [max(k, b) for k, b in zip(kv_usage, busy, strict=True)]
    return sum(vals) / len(vals) if vals else 0.0


@dataclass(slots=True)
class ScaleEvent:
    """A replica of `pool` starts (`delta=+1`, ready at `ready_s`) or stops (`delta=-1`)."""

    pool: str
    delta: int
    at_s: float
    ready_s: float


@dataclass(slots=True)
class Autoscaler:
    """Turns a desired-replica signal into replica starts (ready after a cold start) and stops.

    Scale-up is immediate (new replicas become ready `cold_start_s` later); scale-down waits until the
    signal has stayed below the ready count for `scale_down_delay_s` (HPA's stabilisation window).
    """

    cold_start_s: float = 60.0
    scale_down_delay_s: float = 120.0
    ready: dict[str, int] = field(default_factory=dict)
    pending: list[ScaleEvent] = field(default_factory=list)
    _below_since: dict[str, float] = field(default_factory=dict)

    def step(self, now: float, desired: Mapping[str, int]) -> list[ScaleEvent]:
        """Apply one signal at `now`; returns the starts and stops decided now."""
        events: list[ScaleEvent] = []
        for pool, want in desired.items():
            have = self.ready.get(pool, 0)
            coming = sum(1 for e in self.pending if e.pool == pool)
            if want > have + coming:
                self._below_since.pop(pool, None)
                for _ in range(want - have - coming):
                    e = ScaleEvent(pool, +1, now, now + self.cold_start_s)
                    self.pending.append(e)
                    events.append(e)
            elif want < have:
                since = self._below_since.setdefault(pool, now)
                if now - since >= self.scale_down_delay_s:
                    for _ in range(have - max(want, 1)):
                        events.append(ScaleEvent(pool, -1, now, now))
                    self.ready[pool] = max(want, 1)
                    self._below_since.pop(pool, None)
            else:
                self._below_since.pop(pool, None)
        return events

    def advance(self, now: float) -> list[ScaleEvent]:
        """Replicas whose cold start has ended by `now` (they now count as ready)."""
        done = [e for e in self.pending if e.ready_s <= now]
        if done:
            self.pending = [e for e in self.pending if e.ready_s > now]
            for e in done:
                self.ready[e.pool] = self.ready.get(e.pool, 0) + 1
        return done
